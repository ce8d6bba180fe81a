"""The demo's verdicts, its report.md and the summary table printed at the end of ``fastcm demo``."""
from fastcm.eval.report import markdown_table

METHOD_LABELS = {"ict": "iCT", "sct": "sCT", "meanflow": "MeanFlow"}
TWO_STEP = {"ict": "σ 80 → 0.821", "sct": "t 1.565 → 1.1", "meanflow": "t 1 → 0.5 → 0"}  # each method's sampler


def rows_of(method: str) -> tuple:
    """(metrics key, row label) of a demo report whose stage 1 used ``method``."""
    m = METHOD_LABELS[method]
    return (("real_train_split", "real train split (reference)"), ("one_step", f"{m}, one step"),
            ("two_step", f"{m}, two steps ({TWO_STEP[method]})"), ("fd_finetuned", "FD fine-tune, one step"))


ROWS = rows_of("ict")
# Which feature space the FD stage optimises and which one judges it (fastcm.eval.demo_eval).
FD_STAGE_SPACES = {"optimised": "digits", "judged_by": "digits-heldout",
                   "statement": "the FD stage minimises the FD in the digits CNN's 64-d feature space (SmallCNN), so "
                                "that space improves by construction; it is judged by the held-out judge's 48-d space "
                                "(HeldOutCNN, another architecture and seed, never used in training)"}


def quality_checks(report: dict, goals: dict) -> dict:
    """Pass/fail of the demo's quality goals, and an honest statement of what pixel-space FD did."""
    m = report["metrics"]
    one = m["one_step"]
    checks = {"one_step_cas": {"value": one["cas"], "goal": f">= {goals['min_one_step_cas']}",
                               "passed": one["cas"] >= goals["min_one_step_cas"]}}
    fd = m.get("fd_finetuned")
    if fd is not None:
        key = "fd_heldout" if "fd_heldout" in fd and "fd_heldout" in one else "fd_features"
        space = "held-out judge (digits-heldout)" if key == "fd_heldout" else "classifier (digits)"
        reduction = (one[key] - fd[key]) / one[key]
        checks["fd_reduction"] = {"value": reduction, "before": one[key], "after": fd[key], "metric": key,
                                  "goal": f">= {goals['min_fd_reduction']:.0%} lower FD in the {space} feature space",
                                  "passed": reduction >= goals["min_fd_reduction"]}
        if key == "fd_heldout":
            trained = (one["fd_features"] - fd["fd_features"]) / one["fd_features"]
            checks["fd_optimised_space"] = {
                "before": one["fd_features"], "after": fd["fd_features"], "relative_change": -trained,
                "statement": f"in the space the FD stage optimised (digits CNN) the FD went {one['fd_features']:.3g} "
                             f"→ {fd['fd_features']:.3g} ({-trained:+.1%}): an improvement there is by construction, "
                             f"so the goal is judged in the held-out judge's space ({one[key]:.3g} → "
                             f"{fd[key]:.3g}, {-reduction:+.1%})"}
        drop = one["cas"] - fd["cas"]
        checks["cas_kept"] = {"value": 0.0 - drop + 0.0, "before": one["cas"], "after": fd["cas"],
                              "goal": f"CAS drops by at most {100 * goals['max_cas_drop']:.0f} point",
                              "passed": drop <= goals["max_cas_drop"] + 1e-12}
        change = (fd["fd_pixels"] - one["fd_pixels"]) / one["fd_pixels"]
        checks["pixel_fd"] = {"before": one["fd_pixels"], "after": fd["fd_pixels"], "relative_change": change,
                              "statement": _pixel_statement(one["fd_pixels"], fd["fd_pixels"], change)}
    protocol = report.get("cas_protocol")
    if protocol:
        checks["real_plus_synthetic_beats_real"] = protocol["real_plus_synthetic_beats_real"]
    checks["all_passed"] = all(c["passed"] for c in checks.values() if isinstance(c, dict) and "passed" in c)
    return checks


def _pixel_statement(before: float, after: float, change: float) -> str:
    where = "the FD loss never sees pixels, so this is a held-out check"
    if abs(change) < 0.02:
        return f"pixel-space FD stayed about the same ({before:.3g} → {after:.3g}, {change:+.1%}); {where}"
    verb = "fell" if change < 0 else "rose"
    tail = "" if change < 0 else " — the fine-tune improved its own feature space more than raw pixel statistics"
    return f"pixel-space FD {verb} {abs(change):.1%} ({before:.3g} → {after:.3g}); {where}{tail}"


def _metric_rows(report: dict) -> list:
    rows = []
    for key, label in rows_of(report.get("method", "ict")):
        r = report["metrics"].get(key)
        if r is not None:
            rows.append([label, r["cas"], r["fd_features"], r.get("fd_heldout", "—"), r["fd_pixels"],
                         r["label_agreement"], r["n"]])
    return rows


def _protocol_table(p: dict) -> str:
    rows = [[arm, p[arm]["train_size"], p[arm]["mean"], p[arm]["std"]]
            for arm in ("real", "synthetic", "real+synthetic")]
    return markdown_table(["classifier trained on", "images", "top-1 (mean)", "std over seeds"], rows)


def render_markdown(report: dict) -> str:
    cfg, q, t = report["config"], report["quality"], report["timings_s"]
    judge = "logistic regression on pixels" if cfg["judge"] == "logreg" else "small CNN"
    lines = [
        f"# fastcm demo report ({METHOD_LABELS[report.get('method', 'ict')]})", "",
        f"scikit-learn digits, {report['data']['train_size']} train / {report['data']['test_size']} test images "
        f"({report['data']['split']}); seed {report['seed']}; fastcm {report['environment']['fastcm']}, torch "
        f"{report['environment']['torch']}, {report['environment']['torch_threads']} CPU threads.", "",
        "## Metrics against the real test split", "",
        f"CAS = top-1 on the real test split of a {judge} trained only on the {cfg['per_class']} samples per class "
        "(for the first row: on the real train split). FD features = Fréchet distance in the 64-d feature space of a "
        "small CNN trained once on the train split (test accuracy "
        f"{report['feature_network']['test_accuracy']:.3f}); FD held-out = the same in the 48-d space of the "
        "held-out judge (another architecture and seed, never used in training"
        + (f", test accuracy {report['heldout_network']['test_accuracy']:.3f}" if report.get("heldout_network")
           else "") + "); FD pixels = the same in raw pixel space. Label "
        "agreement = how often that CNN recognises the requested class."
        + (f" Optimised space: {report['fd_stage']['statement']}." if report.get("fd_stage") else ""), "",
        markdown_table(["samples", "CAS", "FD features", "FD held-out", "FD pixels", "label agreement", "n"],
                       _metric_rows(report)),
        "", "## Quality goals", "",
    ]
    for name, c in q.items():
        if isinstance(c, dict) and "passed" in c:
            lines.append(f"- **{name}**: {_fmt(c['value'])} (goal {c['goal']}) — "
                         f"{'passed' if c['passed'] else 'NOT met'}")
    if "fd_optimised_space" in q:
        lines.append(f"- **optimised space**: {q['fd_optimised_space']['statement']}")
    if "pixel_fd" in q:
        lines.append(f"- **pixel FD**: {q['pixel_fd']['statement']}")
    lines.append(f"- all goals met: **{'yes' if q['all_passed'] else 'no'}**")
    p = report.get("cas_protocol")
    if p:
        verdict = {True: "holds", False: "does not hold", None: "cannot be judged"}[p["real_plus_synthetic_beats_real"]]
        lines += ["", "## Real / synthetic / real + synthetic (Azizi et al. 2023 protocol)", "",
                  f"Judge: {p['judge']} trained from scratch, seeds {p['seeds']}"
                  + (f", {p['cnn_steps_per_arm']} Adam steps for every arm (equal compute)" if "cnn_steps_per_arm"
                     in p else "") + f"; synthetic = the {p['samples'].replace('_', ' ')} samples.", "",
                  _protocol_table(p), "",
                  f"The paper's headline (real + synthetic beats real alone) **{verdict}** here: "
                  f"{100 * p['real_plus_synthetic_minus_real']:+.2f} points; {p['verdict']}."]
    lines += fid_curve_lines(report)
    env = report["environment"]
    lines += ["", "## Settings", "", markdown_table(["setting", "value"], [[k, v] for k, v in cfg.items()]),
              "", "## Timings (wall clock, seconds)", "",
              markdown_table(["phase", "seconds"], [[k, v] for k, v in t.items()]), "",
              f"CPU threads: {env['torch_threads']} ({env.get('threads_reason', '')}); load average at start "
              f"{env.get('load_average_start')}, at end {env.get('load_average_end')} on {env.get('cpu_count')} "
              "cores (other processes on the machine slow every phase down)."]
    lines += [f"- {e}" for e in env.get("thread_events", [])]
    lines += ["", "## Files", ""]
    for key, f in report["files"].items():
        lines.append(f"- {key}: " + (", ".join(f.values()) if isinstance(f, dict) else f))
    for key, f in report["checkpoints"].items():
        if f:
            lines.append(f"- checkpoint ({key}): {f}")
    return "\n".join(lines) + "\n"


def fid_curve_lines(report: dict) -> list:
    """The "FID while training" section: each stage's evaluations (``eval_every``), its best, and the share of the
    stage's wall time the evaluations took. Empty when no stage evaluated."""
    rows, shares = [], []
    for stage, records in (report.get("curves") or {}).items():
        evals = [r for r in records if "eval_seconds" in r]
        if not evals:
            continue
        for r in evals:
            rows.append([stage, r["step"], _fmt(r.get("fid_1step")), _fmt(r.get("fid_2step")), r["eval_seconds"],
                         r.get("eval_error", "")])
        seconds = sum(r["eval_seconds"] for r in evals)
        wall = (report.get("stage_seconds") or {}).get(stage)
        share = f", {100 * seconds / wall:.1f} % of the stage's {wall:.0f} s" if wall else ""
        best = (report.get("best") or {}).get(stage)
        found = f"; best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else ""
        shares.append(f"- {stage}: {len(evals)} evaluations, {seconds:.1f} s{share}{found}")
    if not rows:
        return []
    ev = report.get("evaluation") or {}
    what = (f"{ev.get('features', '?')} features against {ev.get('stats', 'the reference')}, "
            f"{ev.get('samples', '?')} samples per sampler") if ev else "the reference statistics"
    return ["", "## FID while training", "",
            f"The EMA model's one- and two-step samples (fixed seeds) in {what}; the curves are in "
            "training_curves.png.", "",
            markdown_table(["stage", "step", "fid_1step", "fid_2step", "seconds", "error"], rows), "", *shares]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_summary(report: dict) -> str:
    """The table printed at the end of the demo."""
    q, t = report["quality"], report["timings_s"]
    head = f"{'samples':<34}{'CAS':>8}{'FD feat':>10}{'FD held':>10}{'FD pix':>9}"
    lines = ["", "fastcm demo results (real test split; FD held = the held-out judge, never trained on)", head,
             "-" * len(head)]
    for label, cas, fdf, fdh, fdp, _, _ in _metric_rows(report):
        lines.append(f"{label:<34}{cas:>8.4f}{fdf:>10.3f}{_fmt(fdh):>10}{fdp:>9.3f}")
    lines.append("")
    for name, c in q.items():
        if isinstance(c, dict) and "passed" in c:
            lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {name}: {_fmt(c['value'])} (goal {c['goal']})")
    if "fd_optimised_space" in q:
        lines.append(f"note  {q['fd_optimised_space']['statement']}")
    if "pixel_fd" in q:
        lines.append(f"note  {q['pixel_fd']['statement']}")
    p = report.get("cas_protocol")
    if p:
        lines.append(f"CAS protocol ({p['judge']}, {len(p['seeds'])} seeds): real {p['real']['mean']:.4f}, "
                     f"synthetic {p['synthetic']['mean']:.4f}, real+synthetic {p['real+synthetic']['mean']:.4f} "
                     f"→ real+synthetic beats real: {p['verdict']}")
    main = {k: v for k, v in t.items() if k.startswith("stage") or k == "total"}
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in main.items()))
    lines.append(f"report: {report['out']}/report.md")
    return "\n".join(lines)


# -- the comparison of methods (fastcm demo --compare) ----------------------------------------------------------------

COMPARE_COLUMNS = ("one_step", "two_step", "fd_finetuned")


def compare_rows(runs: dict) -> list:
    """One row per method: stage-1 steps and seconds, then CAS / feature FD / pixel FD of one step, two steps and
    one step after the FD stage."""
    rows = []
    for method, r in runs.items():
        row = [METHOD_LABELS[method], r["stage1_steps"], r["stage1_seconds"], r.get("stage1_cpu_seconds", "—")]
        for key in COMPARE_COLUMNS:
            m = r["metrics"].get(key)
            row += [m["cas"], m["fd_features"], m["fd_pixels"]] if m else ["—"] * 3
        rows.append(row)
    return rows


def render_compare(report: dict) -> str:
    """compare.md: the methods at an equal time budget of stage 1."""
    heads = ["method", "stage-1 steps", "stage-1 wall s", "stage-1 CPU s"]
    for key in ("1-step", "2-step", "FD-tuned 1-step"):
        heads += [f"{key} CAS", f"{key} FD feat", f"{key} FD pix"]
    env = report["environment"]
    lines = ["# fastcm demo --compare", "",
             f"Stage 1 of each method on scikit-learn digits with an equal budget of {report['budget_s']:.0f} "
             + ("CPU seconds per thread (the process's CPU time, so other jobs on a shared machine do not shrink "
                "it; on an idle machine the same as wall-clock seconds) "
                if report.get("budget_clock") == "cpu" else "wall-clock seconds ")
             + f"(batch {report['config']['batch_size']}, lr {report['config']['lr']}, at most "
             f"{report['config']['ict_steps']} steps), then {report['config']['fd_steps']} FD-loss fine-tune steps "
             "from that model (same settings for every method). CAS = top-1 on the real test split of a "
             f"{report['config']['judge']} judge trained on {report['config']['per_class']} samples per class; "
             "FD feat / FD pix = Fréchet distance to the real test split in the digits-CNN feature space / in pixels "
             f"(lower is better). {env['torch_threads']} CPU threads; load average {env.get('load_average_start')} "
             f"at start, {env.get('load_average_end')} at end on {env.get('cpu_count')} cores.", "",
             markdown_table(heads, compare_rows(report["runs"])), "",
             f"Best one-step CAS: **{report['best']['one_step_cas']}**; best one-step feature FD: "
             f"**{report['best']['one_step_fd_features']}**. Total wall time {report['timings_s']['total']:.0f} s.", ""]
    for method, r in report["runs"].items():
        lines.append(f"- {METHOD_LABELS[method]}: samples (.npz, .png) and checkpoints under `{r['out']}/`; "
                     f"{r['stage1_img_per_s']:.0f} img/s in stage 1")
    return "\n".join(lines) + "\n"
