"""raysim report (tables and plots over seeds) and raysim.study (grids, resumable by cell)."""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from raysim import report, study
from raysim.cli import main
from raysim.config import CONFIG_DIR, ConfigError, UserError


def _fake_run(path, method, seed, accuracies, epsilon=None, uplink=1000):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml({"method": method, "seed": seed, "output_dir": str(path), "eval": {"split": "test"}}))
    rows = [
        {"round": r + 1, "eval_accuracy": a, "train_loss": 1.0 - a, "uplink_bytes": uplink, "epsilon": epsilon if epsilon is not None else float("inf")}
        for r, a in enumerate(accuracies)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path / "metrics.parquet")
    privacy = {"mode": "none"} if epsilon is None else {"mode": "local_dp_sgd", "epsilon": epsilon}
    (path / "summary.json").write_text(json.dumps({"final_eval_accuracy": accuracies[-1] + 0.01, "privacy": privacy}))


def test_report_groups_seeds_into_settings_with_mean_and_std(tmp_path):
    finals = {"lora": [0.50, 0.60, 0.55], "ffa_lora": [0.70, 0.72, 0.74]}
    for method, accs in finals.items():
        for seed, acc in enumerate(accs):
            _fake_run(tmp_path / "study" / f"{method}-{seed}", method, seed, [0.4, acc], epsilon=2.5 + seed)
    _fake_run(tmp_path / "study" / "running", "lora", 3, [0.1])
    (tmp_path / "study" / "running" / "summary.json").unlink()  # not finished: must not count
    out = report.report([tmp_path / "study"], tmp_path / "report")
    text = out.read_text()
    assert "Not finished, left out:" in text and "running (1 rounds)" in text
    for method, accs in finals.items():
        finals_plus = [a + 0.01 for a in accs]  # summary.json's final evaluation, not the last round's
        mean, std = statistics.fmean(finals_plus), statistics.stdev(finals_plus)
        line = next(line for line in text.splitlines() if line.startswith(f"| method={method} |"))
        assert f"{mean:.4f} ± {std:.4f}" in line and "| 3 |" in line
        assert "3.50 ± 1.00" in line  # epsilon 2.5, 3.5, 4.5
        assert "0.00 ± 0.00" in line  # uplink: 2 rounds x 1000 bytes = 0.002 MB
    for name in ("accuracy.png", "train_loss.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_puts_methods_side_by_side_with_differences_paired_by_seed(tmp_path):
    # Two splits x two methods x 3 seeds; the learning rate goes with the method (as a study's
    # where-rules set it), so it must not split a method's runs from the other's.
    finals = {("iid", "lora"): [0.60, 0.62, 0.58], ("iid", "ffa_lora"): [0.63, 0.61, 0.66], ("skew", "lora"): [0.40, 0.45, 0.50], ("skew", "ffa_lora"): [0.60, 0.52, 0.58]}
    for (split, method), accs in finals.items():
        for seed, acc in enumerate(accs):
            path = tmp_path / "study" / f"{split}-{method}-{seed}"
            _fake_run(path, method, seed, [0.3, acc - 0.01])
            config = OmegaConf.load(path / "config.yaml")
            config.data = {"partition": split}
            config.train = {"lr": 0.05 if method == "ffa_lora" else 0.02}
            (path / "config.yaml").write_text(OmegaConf.to_yaml(config))
    text = report.report([tmp_path / "study"], tmp_path / "report", compare="method").read_text()
    assert "| setting | method=ffa_lora | method=lora | ffa_lora − lora, paired by seed | seeds ffa_lora ahead |" in text
    for split in ("iid", "skew"):
        line = next(line for line in text.splitlines() if line.startswith(f"| data.partition={split} |"))
        ffa, lora = finals[(split, "ffa_lora")], finals[(split, "lora")]
        diffs = [a - b for a, b in zip(ffa, lora)]
        assert f"{statistics.fmean(ffa):.4f} ± {statistics.stdev(ffa):.4f} (n=3)" in line
        assert f"{statistics.fmean(lora):.4f} ± {statistics.stdev(lora):.4f} (n=3)" in line
        assert f"{statistics.fmean(diffs):.4f} ± {statistics.stdev(diffs):.4f}" in line
        assert line.endswith(f"| {sum(d > 0 for d in diffs)}/3 |")
    for name in ("accuracy.png", "train_loss.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "r2"), "--compare", "methd"]) == 2
    with pytest.raises(UserError, match="every run has data.partition=iid"):
        report.report([tmp_path / "study" / "iid-lora-0", tmp_path / "study" / "iid-ffa_lora-0"], tmp_path / "r3", compare="data.partition")


def test_rates_tuned_per_method_and_privacy_and_keys_older_runs_lack_do_not_split_a_comparison(tmp_path):
    # methods.yaml beside ffa_vs_lora.yaml: each method's rate tuned per privacy level (so, given
    # the method, rate and level fix each other), Fed-SB at its own rank, and FFA-LoRA's runs saved
    # before attack.* existed. The rows must be the privacy levels, each holding both methods.
    rates = {("ffa_lora", "none"): 0.02, ("ffa_lora", "eps3"): 0.05, ("fed_sb", "none"): 0.044, ("fed_sb", "eps3"): 0.01}
    finals = {}
    for (method, level), lr in rates.items():
        for seed in (0, 1):
            path = tmp_path / "study" / f"{method}-{level}-{seed}"
            finals[method, level, seed] = 0.6 + 0.01 * seed + (0.05 if level == "none" else 0) + (0.02 if method == "fed_sb" else 0)
            _fake_run(path, method, seed, [0.3, finals[method, level, seed] - 0.01])
            config = OmegaConf.load(path / "config.yaml")
            config.train = {"lr": lr}
            config.privacy = {"target_epsilon": 3.0 if level == "eps3" else None}
            config.lora = {"rank": 64 if method == "fed_sb" else 8}
            if method == "fed_sb":  # saved after attack.* was added: the default, written out
                config.attack = {"fraction": 0.0}
            (path / "config.yaml").write_text(OmegaConf.to_yaml(config))
    text = report.report([tmp_path / "study"], tmp_path / "report", compare="method", baseline="ffa_lora").read_text()
    for level, epsilon in (("none", None), ("eps3", 3.0)):
        rows = [line for line in text.splitlines() if line.startswith(f"| privacy.target_epsilon={epsilon} |")]
        assert len(rows) == 2, text  # the side-by-side table and the baseline's
        for method in ("fed_sb", "ffa_lora"):
            accs = [finals[method, level, seed] for seed in (0, 1)]
            assert f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f} (n=2)" in rows[0]
        assert "0.0200 ± 0.0000 (2/2 ahead)" in rows[1]
    assert "attack.fraction" not in text


def test_baseline_gives_every_other_value_its_difference_paired_by_seed(tmp_path):
    finals = {"ffa_lora": [0.60, 0.62, 0.58], "fed_sb": [0.63, 0.61, 0.66], "lora": [0.55, 0.64]}  # lora lacks seed 2
    for method, accs in finals.items():
        for seed, acc in enumerate(accs):
            _fake_run(tmp_path / "study" / f"{method}-{seed}", method, seed, [0.3, acc - 0.01])
    text = report.report([tmp_path / "study"], tmp_path / "report", compare="method", baseline="ffa_lora").read_text()
    head = next(i for i, line in enumerate(text.splitlines()) if line.startswith("| setting | fed_sb − ffa_lora"))
    assert text.splitlines()[head] == "| setting | fed_sb − ffa_lora | lora − ffa_lora |"
    row = text.splitlines()[head + 2]
    for method, ahead in (("fed_sb", 2), ("lora", 1)):
        diffs = [a - b for a, b in zip(finals[method], finals["ffa_lora"])]  # paired by seed, zip stops at lora's 2
        assert f"{statistics.fmean(diffs):.4f} ± {statistics.stdev(diffs):.4f} ({ahead}/{len(diffs)} ahead)" in row
    with pytest.raises(UserError, match="no run has method=fedsb; its values are"):
        report.report([tmp_path / "study"], tmp_path / "r2", compare="method", baseline="fedsb")
    assert main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "r3"), "--baseline", "lora"]) == 2


def test_settings_and_compared_values_are_in_numeric_order(tmp_path):
    # Directory order (alpha=16 < alpha=256 < alpha=64 < alpha=8) is not the values' order.
    for alpha in (16, 256, 64, 8):
        for method in ("lora", "ffa_lora"):
            path = tmp_path / "study" / f"alpha={alpha},method={method}"
            _fake_run(path, method, 0, [0.5])
            config = OmegaConf.load(path / "config.yaml")
            config.lora = {"alpha": alpha}
            (path / "config.yaml").write_text(OmegaConf.to_yaml(config))
    runs = [report.load_run(p) for p in report.find_runs([tmp_path / "study"])]
    assert list(report.comparison_rows(runs, "method")) == [f"lora.alpha={a}" for a in (8, 16, 64, 256)]
    assert report.compare_values(runs, "lora.alpha") == ["8", "16", "64", "256"]
    assert list(report.settings(runs))[:2] == ["lora.alpha=8, method=ffa_lora", "lora.alpha=8, method=lora"]


def test_a_rate_set_per_method_leaves_the_rows_named_by_method(tmp_path):
    # poisoning.yaml: one rate per method, so method and train.lr fix each other with two values each.
    for method, lr in (("ffa_lora", 0.05), ("lora", 0.02)):
        for aggregator in ("mean", "median"):
            path = tmp_path / "study" / f"{method}-{aggregator}"
            _fake_run(path, method, 0, [0.5])
            config = OmegaConf.load(path / "config.yaml")
            config.train = {"lr": lr}
            config.server = {"aggregator": aggregator}
            (path / "config.yaml").write_text(OmegaConf.to_yaml(config))
    runs = [report.load_run(p) for p in report.find_runs([tmp_path / "study"])]
    assert list(report.comparison_rows(runs, "server.aggregator")) == ["method=ffa_lora", "method=lora"]


def test_backdoor_runs_get_their_success_in_the_tables_and_a_plot(tmp_path):
    # poisoning.yaml's shape: aggregators compared per attack; only the backdoor cells measure a
    # success. The clean cells must not get a success row, and a report of clean runs no column.
    success = {("backdoor", "mean"): [0.90, 0.70, 0.80], ("backdoor", "median"): [0.20, 0.40, 0.15]}
    for attack in ("none", "backdoor"):
        for aggregator in ("mean", "median"):
            for seed in range(3):
                path = tmp_path / "study" / f"{attack}-{aggregator}-{seed}"
                _fake_run(path, "ffa_lora", seed, [0.5, 0.6])
                config = OmegaConf.load(path / "config.yaml")
                config.attack = {"kind": attack}
                config.server = {"aggregator": aggregator}
                (path / "config.yaml").write_text(OmegaConf.to_yaml(config))
                if attack == "backdoor":
                    rows = pq.read_table(path / "metrics.parquet").to_pylist()
                    for row, value in zip(rows, (0.1, success[attack, aggregator][seed] - 0.05)):
                        row["attack_success"] = value
                    pq.write_table(pa.Table.from_pylist(rows), path / "metrics.parquet")
                    summary = json.loads((path / "summary.json").read_text())
                    (path / "summary.json").write_text(json.dumps({**summary, "final_attack_success": success[attack, aggregator][seed]}))
    text = report.report([tmp_path / "study"], tmp_path / "report", compare="server.aggregator").read_text()
    attack_table = text.split("The backdoor's success")[1].split("## Every setting")[0]
    rows = [line for line in attack_table.splitlines() if line.startswith("| attack.kind=")]
    assert [r.split(" |")[0] for r in rows] == ["| attack.kind=backdoor"]
    mean, median = success["backdoor", "mean"], success["backdoor", "median"]
    diffs = [a - b for a, b in zip(mean, median)]
    for expected in (f"{statistics.fmean(mean):.4f} ± {statistics.stdev(mean):.4f} (n=3)", f"{statistics.fmean(diffs):.4f} ± {statistics.stdev(diffs):.4f}", "| 3/3 |"):
        assert expected in rows[0]
    setting = next(line for line in text.splitlines() if line.startswith("| attack.kind=backdoor, server.aggregator=median |"))
    assert setting.endswith(f"| {statistics.fmean(median):.4f} ± {statistics.stdev(median):.4f} |")
    clean = next(line for line in text.splitlines() if line.startswith("| attack.kind=none, server.aggregator=mean |"))
    assert clean.endswith("| — |")
    assert (tmp_path / "report" / "attack_success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clean_only = report.report([tmp_path / "study" / "none-mean-0", tmp_path / "study" / "none-median-0"], tmp_path / "r2").read_text()
    assert "backdoor success" not in clean_only and not (tmp_path / "r2" / "attack_success.png").exists()


def _drawn_figures(monkeypatch):
    """The figures report() saves, by file name, kept open to be read back."""
    figures = {}

    def keep(fig, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report, "_save", keep)
    return figures


def test_compared_plots_draw_only_the_settings_with_the_metric_and_name_every_value(tmp_path, monkeypatch):
    # The backdoor's success exists only where there is a backdoor: the clean setting (first in
    # order) gets no empty panel, and the legend names the values drawn in the other panels.
    for attack, aggregators in (("a-none", ("mean",)), ("backdoor", ("mean", "median"))):
        for aggregator in aggregators:
            path = tmp_path / "study" / f"{attack}-{aggregator}"
            _fake_run(path, "ffa_lora", 0, [0.5, 0.6])
            config = OmegaConf.load(path / "config.yaml")
            config.attack = {"kind": attack}
            config.server = {"aggregator": aggregator}
            (path / "config.yaml").write_text(OmegaConf.to_yaml(config))
            if attack == "backdoor":
                rows = [{**row, "attack_success": 0.3} for row in pq.read_table(path / "metrics.parquet").to_pylist()]
                pq.write_table(pa.Table.from_pylist(rows), path / "metrics.parquet")
                summary = json.loads((path / "summary.json").read_text())
                (path / "summary.json").write_text(json.dumps({**summary, "final_attack_success": 0.3}))
    figures = _drawn_figures(monkeypatch)
    report.report([tmp_path / "study"], tmp_path / "report", compare="server.aggregator")

    def panels(fig):
        return [ax.get_title() for ax in fig.axes if ax.get_visible()]

    def legend(fig):
        return [t.get_text() for t in fig.legends[0].get_texts()]

    assert panels(figures["attack_success.png"]) == ["attack.kind=backdoor"]
    assert panels(figures["accuracy.png"]) == ["attack.kind=a-none", "attack.kind=backdoor"]
    for name in ("attack_success.png", "accuracy.png"):
        assert legend(figures[name]) == ["server.aggregator=mean", "server.aggregator=median"]


def test_a_setting_with_one_seed_shows_no_spread(tmp_path):
    _fake_run(tmp_path / "study" / "lora-0", "lora", 0, [0.5])
    _fake_run(tmp_path / "study" / "ffa-0", "ffa_lora", 0, [0.6])
    _fake_run(tmp_path / "study" / "ffa-1", "ffa_lora", 1, [0.7])
    lines = report.report([tmp_path / "study"], tmp_path / "out", compare="method").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| all runs |"))
    assert "| 0.6600 ± 0.0707 (n=2) | 0.5100 (n=1) |" in row  # a sample deviation needs two values


def test_compare_with_a_study_axis_name_points_to_its_config_key(tmp_path):
    for seed in (0, 1):
        for aggregator in ("mean", "median"):
            path = tmp_path / "study" / f"aggregator={aggregator},seed={seed}"
            _fake_run(path, "lora", seed, [0.5])
            config = OmegaConf.load(path / "config.yaml")
            config.server = {"aggregator": aggregator}
            OmegaConf.save(config, path / "config.yaml")
    with pytest.raises(UserError, match="'aggregator'; did you mean server.aggregator"):
        report.report([tmp_path / "study"], tmp_path / "out", compare="aggregator")
    with pytest.raises(UserError, match="'no_such.key'; these runs differ in: server.aggregator$"):
        report.report([tmp_path / "study"], tmp_path / "out", compare="no_such.key")
    assert main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "out"), "--compare", "aggregator"]) == 2


def test_report_names_a_directory_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: holds no run"):
        report.report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(UserError, match="no such directory"):
        report.report([tmp_path / "missing"], tmp_path / "out")
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2


def _study_file(tmp_path, axes, **extra):
    spec = {"base": str(CONFIG_DIR / "tiny.yaml"), "output_dir": str(tmp_path / "out"), "axes": axes, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(OmegaConf.to_yaml(spec))
    return path


def test_study_cells_are_the_product_of_the_axes(tmp_path):
    path = _study_file(
        tmp_path,
        {
            "method": {"lora": {"method": "lora", "train.lr": 0.002}, "ffa_lora": {"method": "ffa_lora"}},
            "data": {"skew": {"data.partition": "label_proportions", "clients.num": 3, "clients.per_round": 3, "data.label_proportions": [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]}},
            "seed": [0, 1, 2],
        },
        settings={"rounds": 2},
        where=[{"match": {"method": "ffa_lora", "seed": [1, 2]}, "set": {"train.lr": 0.05}}],
    )
    base, out, cells = study.load_study(path)
    assert base == CONFIG_DIR / "tiny.yaml" and out == tmp_path / "out" and len(cells) == 6
    assert cells[0].name == "method=lora,data=skew,seed=0"
    configs = {c.name: study.load_config(base, [*c.overrides, f"output_dir={tmp_path}/x"]) for c in cells}
    cfg = configs["method=lora,data=skew,seed=0"]
    assert cfg.method == "lora" and cfg.train.lr == 0.002 and cfg.seed == 0 and cfg.rounds == 2
    assert cfg.data.label_proportions[1] == [0.05, 0.9, 0.05]
    tiny_lr = study.load_config(base, [f"output_dir={tmp_path}/x"]).train.lr
    assert [configs[f"method=ffa_lora,data=skew,seed={s}"].train.lr for s in (0, 1, 2)] == [tiny_lr, 0.05, 0.05]
    with pytest.raises(UserError, match=r"where\[0\].match.seed: no such axis or value"):
        study.load_study(_study_file(tmp_path, {"seed": [0]}, where=[{"match": {"seed": 7}, "set": {"rounds": 1}}]))


def test_only_narrows_a_study_to_the_cells_with_those_values(tmp_path, capsys):
    path = _study_file(tmp_path, {"seed": [0, 1, 2], "method": ["lora", "ffa_lora"]})
    base, out, cells = study.load_study(path)
    chosen = study.select(cells, ["seed=0,2", "method=ffa_lora"])
    assert [c.name for c in chosen] == ["seed=0,method=ffa_lora", "seed=2,method=ffa_lora"]
    assert study.main([str(path), "--list", "--only", "seed=1"]) == 0
    assert capsys.readouterr().out.split() == ["to", "do", "seed=1,method=lora", "to", "do", "seed=1,method=ffa_lora"]
    for bad in ("seed=3", "sed=1", "seed="):
        assert study.main([str(path), "--list", "--only", bad]) == 2
        assert f"--only {bad}:" in capsys.readouterr().err


STUDY_FILES = sorted(p for p in (CONFIG_DIR / "study").glob("*.yaml") if p.name != "base.yaml")


def test_the_shipped_study_files_are_there():
    assert len(STUDY_FILES) >= 4


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_shipped_study_file_gives_valid_configs(tmp_path, path):
    """Each cell's config validates; the only excuse is an optional package it names (the llm
    extra's model or data), and that error must say how to install it."""
    try:
        _check_study_cells(tmp_path, path)
    except ConfigError as err:
        assert "pip install" in str(err), str(err)
        pytest.skip(str(err))


def _check_study_cells(tmp_path, path):
    try:
        base, out, cells = study.load_study(path)
    except UserError as err:  # a grid fed by a search not run yet: its other settings are still checked
        if isinstance(err, ConfigError) and "pip install" in str(err):
            raise
        assert "from: file not found" in str(err), err
        spec = OmegaConf.load(path)
        spec.base = str(path.parent / spec.base)
        spec.where = [rule for rule in spec.where if "from" not in rule]
        OmegaConf.save(spec, tmp_path / path.name)
        base, out, cells = study.load_study(tmp_path / path.name)
    assert cells and str(out).startswith("studies/"), path
    first_seed = cells[0].name.split(",")[0] if cells[0].name.startswith("seed=") else None
    for cell in cells:  # a cell's seed changes no key's validity: one seed's cells are checked
        if first_seed is None or cell.name.split(",")[0] == first_seed:
            study.load_config(base, [*cell.overrides, f"output_dir={out / cell.name}"])


def test_a_study_with_a_bad_key_stops_before_running_anything(tmp_path, capsys):
    path = _study_file(tmp_path, {"seed": [0, 1]}, settings={"lora.rankk": 4})
    assert study.main([str(path)]) == 2
    assert "lora.rankk" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert study.main([str(_study_file(tmp_path, {"seed": 3}))]) == 2


def test_a_finished_cell_the_study_file_no_longer_describes_is_stale(tmp_path, capsys):
    from raysim.config import to_yaml

    path = _study_file(tmp_path, {"seed": [0, 1]}, settings={"train.lr": 0.01})
    base, out, cells = study.load_study(path)
    for cell, lr in zip(cells, (0.01, 0.05)):  # seed=1 ran before the study's lr was edited
        cfg = study.load_config(base, [*cell.overrides, f"output_dir={out / cell.name}", f"train.lr={lr}", "worker.count=1"])
        (out / cell.name).mkdir(parents=True)
        (out / cell.name / "config.yaml").write_text(to_yaml(cfg))
        (out / cell.name / "summary.json").write_text("{}")
    assert study.main([str(path), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["done", "seed=0", "stale", "seed=1"]
    assert study.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "seed=1: train.lr was 0.05, the study now says 0.01" in err and "seed=0" not in err
    assert (out / "seed=1" / "summary.json").read_text() == "{}"


def test_a_study_starts_ray_as_its_ray_settings_say(tmp_path, monkeypatch):
    import ray

    seen = []
    monkeypatch.setattr(study, "run_cell", lambda base, run_dir, cell: seen.append(ray.cluster_resources().get("CPU")))
    path = _study_file(tmp_path, {"seed": [0]}, settings={"ray.num_cpus": 1})
    ray_was_up = ray.is_initialized()
    if ray_was_up:
        ray.shutdown()
    try:
        assert study.main([str(path), "--sequential"]) == 0
        assert not ray.is_initialized(), "the study shuts down the Ray it started"
    finally:
        if ray_was_up:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    assert seen == [1.0]


def _metrics(run_dir):
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    return [(r["round"], r["clients"], r["train_loss"], r["eval_accuracy"], r["eval_loss"]) for r in rows]


def test_a_study_runs_its_cells_as_tune_trials_two_at_a_time_and_resumes(tmp_path, capsys, ray_session):
    """On the tests' Ray (2 CPUs) cells of one 1-CPU worker run two at once, each trial holding its
    simulation's placement group; an interrupted study skips its finished cells and resumes the
    others; a cell's results equal the same cell run alone; Tune's own outputs are there; and the
    study leaves up the Ray it found (as in a notebook)."""
    settings = {"rounds": 2, "worker.count": 1, "train.local_steps": 1, "eval.max_examples": 20, "checkpoint.every": 1}
    path = _study_file(tmp_path, {"seed": [0, 1, 2, 3]}, settings=settings)
    assert study.main([str(path)]) == 0
    out = tmp_path / "out"
    (experiment,) = (out / "_tune").iterdir()
    # A trial holds its cell's CPU from its start (its last report's time_total_s before the cell's
    # summary.json, so never earlier than it started) to that summary.json. The cells' own rounds
    # last well under a second, too short to overlap reliably; starting the workers takes seconds.
    spans = {}
    for trial in experiment.glob("*/params.json"):
        cell = json.loads(trial.read_text())["cell"]
        end = (out / cell / "summary.json").stat().st_mtime
        last = json.loads((trial.parent / "result.json").read_text().splitlines()[-1])
        spans[cell] = (end - last["time_total_s"], end)
    assert sorted(spans) == ["seed=0", "seed=1", "seed=2", "seed=3"]
    at_once = [sum(s <= start < e for s, e in spans.values()) for start, _ in spans.values()]
    assert max(at_once) == 2, spans  # some cells ran together, never more than the CPUs hold
    progress = sorted(experiment.glob("*/progress.csv"))
    assert len(progress) == 4 and all("eval_accuracy" in p.read_text().splitlines()[0] for p in progress)

    finished = (out / "seed=0" / "summary.json").stat().st_mtime_ns
    uninterrupted = _metrics(out / "seed=3")
    (out / "seed=3" / "summary.json").unlink()  # as if interrupted after round 1's checkpoint
    shutil.rmtree(out / "seed=3" / "checkpoints" / "round-000002")
    capsys.readouterr()  # Ray Tune's results table
    assert study.main([str(path), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["done", "seed=0", "done", "seed=1", "done", "seed=2", "resumable", "seed=3"]
    assert study.main([str(path)]) == 0
    assert ray_session.is_initialized(), "the study shut down a Ray it did not start"
    assert (out / "seed=0" / "summary.json").stat().st_mtime_ns == finished
    assert _metrics(out / "seed=3") == uninterrupted

    assert study.main([str(path), "--sequential", "--only", "seed=1", "--output-dir", str(tmp_path / "alone")]) == 0
    assert _metrics(tmp_path / "alone" / "seed=1") == _metrics(out / "seed=1")
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "| all runs | 4 | 2 |" in (tmp_path / "report" / "report.md").read_text()


def test_a_search_tunes_each_cell_on_validation_and_feeds_a_grid(tmp_path, ray_session):
    settings = {"rounds": 2, "worker.count": 1, "train.local_steps": 1, "eval.max_examples": 20}
    path = _study_file(tmp_path, {"method": ["lora"]}, settings=settings, search={"train.lr": {"loguniform": [1e-4, 1e-1]}}, trials=2)
    assert study.main([str(path)]) == 0
    best = OmegaConf.to_container(OmegaConf.load(tmp_path / "out" / "best.yaml"))["method=lora"]
    trials = sorted((tmp_path / "out" / "method=lora" / "search").iterdir())
    assert len(trials) == 2
    scores, rates = [], []
    for trial in trials:
        cfg = OmegaConf.load(trial / "config.yaml")
        assert cfg.eval.split == "validation" and cfg.data.validation_fraction == 0.1  # the test split is never looked at
        rates.append(cfg.train.lr)
        scores.append(max(r[3] for r in _metrics(trial)))
    assert best["set"]["train.lr"] in [r for r, s in zip(rates, scores) if s == max(scores)] and best["eval_accuracy"] == max(scores)
    assert 1e-4 <= best["set"]["train.lr"] <= 1e-1 and best["match"] == {"method": "lora"}
    assert study.main([str(path), "--list"]) == 0  # a searched cell is done
    assert study.main([str(path), "--output-dir", str(tmp_path / "again")]) == 0  # seeded: the same draws again
    again = sorted(OmegaConf.load(t / "config.yaml").train.lr for t in (tmp_path / "again" / "method=lora" / "search").iterdir())
    assert again == sorted(rates)

    grid = tmp_path / "grid.yaml"
    grid.write_text(OmegaConf.to_yaml({"base": str(CONFIG_DIR / "tiny.yaml"), "output_dir": "g", "axes": {"method": ["lora", "ffa_lora"]}, "where": [{"from": "out/best.yaml"}]}))
    _, _, cells = study.load_study(grid)
    assert f"train.lr={best['set']['train.lr']}" in cells[0].overrides and not any(o.startswith("train.lr") for o in cells[1].overrides)
    mapped = {"from": "out/best.yaml", "map": {"method": {"lora": ["lora", "ffa_lora"]}}}  # lora's rate for both
    grid.write_text(OmegaConf.to_yaml({"base": str(CONFIG_DIR / "tiny.yaml"), "output_dir": "g", "axes": {"method": ["lora", "ffa_lora"]}, "where": [mapped]}))
    _, _, cells = study.load_study(grid)
    assert all(f"train.lr={best['set']['train.lr']}" in c.overrides for c in cells)


def test_a_search_whose_trials_fail_chooses_nothing_and_says_why(tmp_path, ray_session, capsys):
    # The check before running samples each range's low end (3 clients a round: valid); the
    # trials draw from 3 to 99 of tiny.yaml's 10 clients, so they fail in the trial itself.
    settings = {"rounds": 1, "worker.count": 1, "eval.max_examples": 20}
    path = _study_file(tmp_path, {"method": ["lora"]}, settings=settings, search={"clients.per_round": {"randint": [3, 100]}}, trials=2)
    assert study.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "cell method=lora: 2 of its search trials failed, so no value was chosen" in err and "clients.per_round" in err
    assert not (tmp_path / "out" / "best.yaml").exists()


@pytest.mark.skipif(not os.environ.get("RAYSIM_LONG"), reason="about 90 s: a study interrupted with SIGINT; set RAYSIM_LONG=1")
def test_tuner_restore_finishes_an_interrupted_study(tmp_path):
    settings = {"rounds": 3, "worker.count": 1, "train.local_steps": 2, "eval.max_examples": 20, "ray.num_cpus": 2}
    path = _study_file(tmp_path, {"seed": [0, 1, 2, 3]}, settings=settings)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "raysim.study", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.time() + 240
    while len(list(out.glob("*/summary.json"))) < 2 and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130  # "interrupted; run the same command to go on"
    assert len(list(out.glob("*/summary.json"))) < 4, "the study finished before it was interrupted"
    (experiment,) = (out / "_tune").iterdir()
    code = (
        "import ray; from ray import tune; from raysim.study_tune import trainable_for; ray.init(num_cpus=2); "
        f"tune.Tuner.restore({str(experiment)!r}, trainable_for({str(path)!r}), resume_errored=True, restart_errored=False).fit()"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=400)
    assert len(list(out.glob("*/summary.json"))) == 4
