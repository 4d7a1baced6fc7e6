"""bench.py's report: its numbers as the lines a person reads."""

from __future__ import annotations

import statistics

from mnist_cnn.bench import levers

FIT_ROW = "model.fit [FusedAdam]"  # fit()'s own step in the training table (bench.row_key)
TORCH_ROW = "PyTorch, the same CNN [torch Adam]"  # bench.torch_peer's, where torch is installed


def report(results: dict) -> str:
    lines = []
    machine = results.get("machine")
    if machine and "cpu" in machine:
        default = "on" if machine["onednn_tensorflow_default"] else "off"
        lines.append(f"machine: {machine['cpu']} (TensorFlow's own oneDNN default on this CPU: {default}), "
                     f"{machine['cpus']} cores, {machine['gpus']} GPUs; TensorFlow {machine['tensorflow']}, "
                     f"Keras {machine['keras']}")
    lines.append(f"forward pass: {results['forward_mflop']:.2f} MFLOP per image (training step ~3x)")
    if "peak" in results:
        lines.append("matmul ceiling (2048x2048): " + ", ".join(
            f"{precision} {gflops:.0f} GFLOP/s" for precision, gflops in results["peak"].items()))
    lines.append("")
    for batch, rows in results["training"].items():
        lines.append(f"training, batch {batch}:")
        lines.append(f"  {'contender':<28} {'optimizer':<10} {'ms/step':>8} {'images/s':>9} {'vs notebook':>11}"
                     f" {'GFLOP/s':>8} {'of peak':>8} {'spread':>7}")
        for r in rows.values():
            lines.append(
                f"  {r['contender']:<28} {r['optimizer']:<10} {r['ms_per_step']:8.1f} {r['images_per_s']:9.0f}"
                f" {r['vs_notebook']:10.2f}x {r['gflop_per_s']:8.1f} {100 * r.get('peak_fraction', 0):7.0f}%"
                f" {r['spread_pct']:6.0f}%"
            )
        peer = rows.get(TORCH_ROW)
        if peer and FIT_ROW in rows:
            lines.append(f"  {FIT_ROW} against PyTorch (the same CNN, Adam, batch, threads): "
                         f"{peer['ms_per_step'] / rows[FIT_ROW]['ms_per_step']:.2f}x its speed")
    if results.get("torch"):
        lines.append(f"  ({results['torch']})")
    ev = results["evaluation"]
    lines.append(
        f"evaluation of {ev['images']:,} images: model.evaluate {ev['seconds']['model.evaluate']:.2f} s, "
        f"tutorial batch-wise predict {ev['seconds']['tutorial batch-wise predict']:.2f} s -> {ev['speedup']:.1f}x"
    )
    pipe = results.get("pipeline")
    if pipe:
        s = pipe["seconds"]
        lines.append(
            f"full-size input pipeline ({pipe['train_images']:,} IDX images, {pipe['steps']} steps): "
            f"{s['IDX pipeline, first epoch']:.1f} s vs {s['in-memory batch']:.1f} s in memory -> "
            f"{pipe['overhead_pct']:+.1f} % (reading the IDX files: {pipe['read_idx_seconds']:.1f} s)"
        )
    lines += where_time_goes(results)
    for over in results.get("run_overhead", []):
        lines.append(
            f"run overhead, {over['label']}: {over['seconds']:.1f} s for {over['steps']} steps of "
            f"{over['bare_ms_per_step']:.1f} ms -> {over['ratio']:.2f}x the bare steps"
        )
    start = results.get("offline_start")
    if start:
        lines.append(f"offline start to first training step (--data auto): {start['seconds']:.1f} s, {start['source']}")
    lines += accuracy_lines(results)
    return "\n".join(lines)


def accuracy_lines(results: dict) -> list[str]:
    """The recipes' (or --versus') test accuracy and wall time, where measured."""
    lines, acc = [], results.get("accuracy")
    if acc:
        lines.append(f"accuracy on {acc['test_set']} (round k: --seed k):")
        width = max(map(len, acc["recipes"]))
        for recipe, runs in acc["recipes"].items():
            scores = " ".join(f"{r['test_accuracy']:.4f}" for r in runs)
            scores += f", median {statistics.median(r['test_accuracy'] for r in runs):.4f}"
            times = " ".join(f"{r['seconds']:.0f}" for r in runs)
            precision = ", mixed precision" if runs[0]["mixed_precision"] else ""
            lines.append(f"  {recipe:<{width}} {scores}  ({runs[0]['epochs']} epochs on "
                         f"{runs[0]['train_images']:,} digits{precision}; {times} s)")
        if "fast_vs_tutorial" in acc:
            lines.append(f"  fast / tutorial wall time (medians): {acc['fast_vs_tutorial']:.2f}x")
    return lines


def where_time_goes(results: dict) -> list[str]:
    """The op profile, the kernel floor and the levers, where measured."""
    lines, profile = [], results.get("op_profile")
    if profile:
        busy = sum(profile.values())
        lines.append("one training step (batch 50, float32), op time by class (summed over threads):")
        for name, ms in sorted(profile.items(), key=lambda item: -item[1]):
            lines.append(f"  {name:<40} {ms:6.2f} ms  {100 * ms / busy:4.0f}%")
    floor, fit = results.get("kernel_floor"), results["training"].get(50, {}).get(FIT_ROW)
    if floor and fit:
        step_gflop = 3 * results["forward_mflop"] * floor["batch_size"] / 1000
        lines += floor_lines(floor, step_gflop, results["peak"]["float32"], fit["ms_per_step"])
    if results.get("levers"):
        lines += levers.lines(results["levers"], default_onednn=results.get("machine", {}).get("onednn"))
    return lines


def floor_lines(floor: dict, step_gflop: float, peak: float, fit_ms: float) -> list[str]:
    """The kernel floor for bench.py's report: each kernel, the sum, and what it allows."""
    lines = [f"kernels of one training step (batch {floor['batch_size']}, float32), each timed alone "
             f"(less {floor['call_ms']:.2f} ms per call):"]
    for name, row in floor["kernels"].items():
        speed = "" if row["gflop_per_s"] is None else f"{row['gflop_per_s']:6.0f} GFLOP/s"
        lines.append(f"  {name:<34} {row['ms']:6.2f} ms  {speed}")
    best = step_gflop / floor["ms"] * 1000
    share = 100 * floor["ms"] / fit_ms
    lines.append(f"  sum: {floor['ms']:.1f} ms a step = {best:.0f} GFLOP/s = {100 * best / peak:.0f}% of the float32"
                 f" ceiling at most; model.fit takes {fit_ms:.1f} ms ({share:.0f}% of it in kernels)")
    return lines


def serving_lines(serving: dict) -> str:
    """The load and attack test's lines (``bench.serving``)."""
    r, b = serving["single"], serving["batch"]
    lines = [f"serving load test (mnist-cnn-serve on 127.0.0.1, a SavedModel; server RSS idle "
             f"{serving['rss_idle_mb']:.0f} MB; peak = the server's VmHWM during the case):",
             f"  {r['clients']} clients x {r['requests'] // r['clients']} requests of 1 image, with {r['idle']} idle "
             f"and {r['trickling']} trickling connections open: {r['errors']} errors, median {r['median_ms']:.0f} ms, "
             f"p99 {r['p99_ms']:.0f} ms, {r['requests_per_s']:.0f} requests/s, peak {r['peak_mb']:.0f} MB",
             f"  {b['clients']} clients x {b['requests'] // b['clients']} requests of 256 images: "
             f"{b['errors']} errors, median {b['median_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms, "
             f"{b['requests_per_s']:.1f} requests/s, peak {b['peak_mb']:.0f} MB"]
    for bombs, what in ((serving["bombs"], "PNGs of 6300x6300 16-bit RGBA"),
                        (serving["jpeg_bombs"], "JPEGs: 60,000 scans, 13000x13000 progressive, 16000x11000 CMYK")):
        sizes = sorted({round(n / 1e3, 1) for n in bombs["bytes"]})
        lines.append(f"  {len(bombs['bytes'])} image bombs at once ({'/'.join(f'{k:g}' for k in sizes)} kB {what}): "
                     f"statuses {bombs['statuses']}, slowest {bombs['max_ms']:.0f} ms, peak memory "
                     f"+{max(0.0, bombs['grown_mb']):.0f} MB, {bombs['cpu_s']:.2f} CPU-s")
    if "stalled" in serving:
        c = serving["stalled"]
        lines.append(f"  {c['requests']} gRPC Predicts of 1 image while {c['stalled']} stalled gRPC calls are held: "
                     f"{c['errors']} errors, median {c['median_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms, "
                     f"peak {c['peak_mb']:.0f} MB")
    else:
        lines.append("  stalled gRPC calls: not measured (the grpc extra is not installed)")
    c = serving["flood"]
    lines.append(f"  {c['requests']} predicts of 1 image among {c['silent']:,} silent sockets that reconnect when "
                 f"closed ({c['reconnects']:,} closed to make room): {c['errors']} errors, median "
                 f"{c['median_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms, peak {c['peak_mb']:.0f} MB")
    b = serving["batching"]
    lines.append(f"  one model call on {b['images']} images: {b['batched_ms']:.1f} ms; {b['images']} calls on one: "
                 f"{b['one_by_one_ms']:.1f} ms ({b['speedup']:.1f}x)")
    if "batched" in serving:
        runs = serving["batched"]
        for size, r in runs.items():
            lines.append(f"  --max-batch-size {size}: {r['clients']} clients (kept alive) x "
                         f"{r['requests'] // r['clients']} requests of 1 image: "
                         f"{r['errors']} errors, median {r['median_ms']:.1f} ms, p99 "
                         f"{r['p99_ms']:.1f} ms, {r['requests_per_s']:.0f} requests/s, server CPU "
                         f"{r['cpu_ms_per_request']:.2f} ms a request; first request after warm-up "
                         f"{r['first_ms']:.1f} ms")
        if {1, 32} <= set(runs):
            off, on = runs[1], runs[32]
            lines.append(f"  batching: {on['requests_per_s'] / off['requests_per_s']:.2f}x the requests/s of "
                         f"--max-batch-size 1, p99 {on['p99_ms'] / off['p99_ms']:.2f}x")
    return "\n".join(lines)
