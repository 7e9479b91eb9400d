"""What a run shows while it runs: accelerate trackers and the progress display."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from conftest import ROOT, run_train
from test_e2e import TINY_DIGITS, check_ok, read_metrics


def read_events(path):
    """Scalars of a TensorBoard event file (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_gets_the_scalars_of_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    check_ok(run_train(TINY_DIGITS + ["--max_train_steps", 4, "--output_dir", out, "--report_to", "tensorboard"]))
    files = sorted((out / "fixmatch").glob("events.out.tfevents.*"))
    assert files, list(out.rglob("*"))
    assert "--no-plots" in TINY_DIGITS and not list(out.glob("*.png"))
    scalars = read_events(files[0])
    train_rows, eval_rows = read_metrics(out)
    for row in train_rows:
        for key in ("loss", "loss_u", "mask_ratio", "pseudo_label_acc", "lr"):
            if row[key] is None:  # null in metrics.jsonl (no pseudo-label in the window): no point in the tracker
                assert row["step"] not in scalars.get(key, {}), key
                continue
            assert abs(scalars[key][row["step"]] - row[key]) < 1e-6 * max(1.0, abs(row[key])), key
    assert abs(scalars["top1"][eval_rows[-1]["step"]] - eval_rows[-1]["top1"]) < 1e-4
    # The resolved settings go to the tracker as hyperparameters.
    assert any("mu" in f.read_bytes().decode("latin-1") for f in (out / "fixmatch").rglob("events.out.tfevents.*"))


def test_a_terminal_gets_one_progress_bar_and_a_log_gets_plain_lines(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), *map(str, TINY_DIGITS + ["--max_train_steps", 4])]
    # A log file (not a terminal): one plain line per logging step, no bar.
    logged = run_train(TINY_DIGITS + ["--max_train_steps", 4, "--output_dir", tmp_path / "log"])
    check_ok(logged)
    assert "step 2/4 loss" in logged.stdout and "step 4/4 loss" in logged.stdout
    assert "fixmatch:" not in logged.stderr and "\r" not in logged.stderr
    # A terminal: the bar (step/total, loss, mask, pseudo-label accuracy, images/s) and no plain step lines.
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns, as a terminal has
    proc = subprocess.Popen(args + ["--output_dir", str(tmp_path / "tty")], cwd=ROOT, stdin=secondary,
                            stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed when the run ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "fixmatch: 100%" in screen and "4/4" in screen
    assert "mask=" in screen and "pl_acc=" in screen and "img_s=" in screen and "loss=" in screen
    assert "step 2/4 loss" not in screen
    assert "final EMA model" in screen
