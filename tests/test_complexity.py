"""Params and FLOPs with the table's convention, and the complexity command's outputs."""

from __future__ import annotations

import pandas as pd

from resnet_repro.rows import all_rows
from tests.conftest import run_cli


def test_complexity_command_reproduces_the_table(tmp_path) -> None:
    """Run from another directory, it writes into that directory's results/ (not the package's tree)."""
    proc = run_cli([], cwd=tmp_path, module="resnet_repro.complexity")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    tmp_path = tmp_path / "results"
    assert "22 rows: 21 agree, 1 error(s) of the table, 0 mismatch(es)" in proc.stdout
    assert sum(line.startswith("| `") for line in proc.stdout.splitlines()) == 22
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]  # a line as each row is done
    assert [line.split("]")[0] for line in progress] == [f"[{i}/22" for i in range(1, 23)]

    df = pd.read_csv(tmp_path / "complexity.csv").set_index("row")
    assert {"row", "params", "flops_g"} <= {df.index.name, *df.columns}
    for row in all_rows():
        got = df.loc[row.name]
        assert got.params == row.params_exact, row.name
        assert round(got.flops_g, 2) == row.flops_g_table, row.name
        if row.name == "resnet34_8xb32_in1k":
            assert row.params_m_table == 2.18 and round(got.params / 1e6, 2) == 21.80
            assert got.status.startswith("table error")
        else:
            assert round(got.params / 1e6, 2) == row.params_m_table and got.status == "ok", row.name
    # recipes.md §8 recounts, to 4 decimals
    assert df.loc["resnet50_8xb32_in1k"].flops_g == 4.1199
    assert df.loc["resnetv1d50_8xb32_in1k"].flops_g == 4.3633
    assert df.loc["resnetv1c50_8xb32_in1k"].flops_g == 4.3619
    assert df.loc["resnet18_8xb16_cifar10"].flops_g == 0.5572
    assert df.loc["resnet50_8xb8_cub"].flops_g == 16.4795
    text = (tmp_path / "complexity.md").read_text()
    assert "table error" in text and text.count("| `") == 22
    assert (
        "| :--- | ---: | ---: |" in text
        and "| `resnet50_8xb32_in1k` | 224 | 25.56 | 25.56 | 4.1199 | 4.12 | ok |" in text
    )
