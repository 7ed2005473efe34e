"""TensorBoard cross-checks for trainer_test, with the tensorboard package's readers.

check RUN [--files N]: reads RUN's event files with TensorBoard's EventFileLoader
  (what TensorBoard itself runs, simple values migrated to scalar tensors) and
  its EventAccumulator, and compares every scalar and step with RUN/metrics.jsonl
  (as float32: TensorBoard keeps scalars so). Also: every record passes the
  reader's CRC checks, each file starts with file_version "brain.Event:2", no
  (tag, step) appears twice, and the last config text is RUN/config.txtpb.
  With --files, RUN must hold N event files. Exits 1 on a mismatch.
corrupt RUN OUT: copies RUN's first event file to OUT, flips one byte inside
  its third record, and checks that the reader's CRC check fails there.
"""
import argparse
import glob
import json
import os
import shutil
import struct
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
from tensorboard.util import tensor_util

errors_found = []


def fail(message):
    errors_found.append(message)
    print("mismatch:", message, file=sys.stderr)


def event_files(run):
    return sorted(glob.glob(os.path.join(run, "events.out.tfevents.*")))


def raw_records(path):
    """Every record through the reader's CRC checks; DataLossError if one fails."""
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    records = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return records
        records.append(reader.record())


def check(run, files_expected):
    files = event_files(run)
    if files_expected is not None and len(files) != files_expected:
        fail(f"{len(files)} event files in {run}, expected {files_expected}: {files}")
    scalars, texts, restarts = {}, {}, []
    for path in files:
        try:
            n_records = len(raw_records(path))
        except errors.DataLossError as e:
            fail(f"{path}: {e}")
            continue
        events = list(event_file_loader.EventFileLoader(path).Load())
        if len(events) != n_records:
            fail(f"{path}: the loader read {len(events)} of {n_records} records")
        if not events or events[0].file_version != "brain.Event:2":
            fail(f"{path}: the first record is not file_version brain.Event:2")
        for event in events:
            if event.HasField("session_log"):
                restarts.append(event.step)
            for value in event.summary.value:
                key = (value.tag, event.step)
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "scalars":
                    table, item = scalars, tensor_util.make_ndarray(value.tensor).item()
                elif plugin == "text":
                    table, item = texts, tensor_util.make_ndarray(value.tensor).item().decode()
                else:
                    fail(f"{path}: value {value.tag} of plugin '{plugin}'")
                    continue
                if key in table:
                    fail(f"{value.tag} at step {event.step} appears twice")
                table[key] = item

    expected = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            # Numbers, and lists of numbers as KEY/0, KEY/1, ... (the trainer's
            # per-layer pattern_density).
            flat = []
            for key, value in record.items():
                if isinstance(value, list):
                    flat += [(f"{key}/{i}", v) for i, v in enumerate(value)]
                else:
                    flat.append((key, value))
            for key, value in flat:
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if (key, record["step"]) in expected:
                        fail(f"metrics.jsonl: {key} at step {record['step']} appears twice")
                    expected[(key, record["step"])] = value
    for key in sorted(expected.keys() - scalars.keys()):
        fail(f"{key[0]} at step {key[1]} is in metrics.jsonl but not in the event files")
    for key in sorted(scalars.keys() - expected.keys()):
        fail(f"{key[0]} at step {key[1]} is in the event files but not in metrics.jsonl")
    for key in sorted(expected.keys() & scalars.keys()):
        if np.float32(expected[key]) != np.float32(scalars[key]):
            fail(f"{key[0]} at step {key[1]}: metrics.jsonl {expected[key]!r}, "
                 f"event file {scalars[key]!r}")

    # TensorBoard's accumulator (which also applies SessionLog.START purges).
    acc = event_accumulator.EventAccumulator(run, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    seen = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    if seen.keys() != expected.keys():
        fail(f"EventAccumulator: {len(seen)} scalars, metrics.jsonl {len(expected)}")
    for key in seen.keys() & expected.keys():
        if np.float32(seen[key]) != np.float32(expected[key]):
            fail(f"EventAccumulator: {key[0]} at step {key[1]}: {seen[key]!r}, "
                 f"metrics.jsonl {expected[key]!r}")

    with open(os.path.join(run, "config.txtpb")) as f:
        config = f.read()
    configs = sorted((step, text) for (tag, step), text in texts.items() if tag == "config")
    if not configs:
        fail("no config text")
    elif configs[-1][1] != "```\n" + config + "```\n":
        fail("the last config text is not config.txtpb in a fenced block")

    steps = sorted({step for _, step in scalars})
    print(f"{len(files)} event files, {len(scalars)} scalars at {len(steps)} steps "
          f"({steps[:1]}..{steps[-1:]}), {len(configs)} config texts, restarts at {restarts}: "
          f"{'OK' if not errors_found else f'{len(errors_found)} mismatches'}")


def corrupt(run, out_dir):
    source = event_files(run)[0]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, os.path.basename(source))
    shutil.copyfile(source, path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    offset = 0
    for _ in range(2):  # skip two records: uint64 length, crc, data, crc
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 12 + length + 4
    (length,) = struct.unpack_from("<Q", data, offset)
    data[offset + 12 + length // 2] ^= 0x20
    with open(path, "wb") as f:
        f.write(data)
    try:
        raw_records(path)
        fail(f"{path}: a flipped byte in record 2 passed the CRC check")
    except errors.DataLossError as e:
        if "crc32" not in str(e):
            fail(f"{path}: expected a CRC error, got {e}")
    loaded = list(event_file_loader.EventFileLoader(path).Load())
    if len(loaded) != 2:
        fail(f"{path}: the loader read {len(loaded)} records, expected the 2 before the bad one")
    print(f"corrupted record 2 of {path}: "
          f"{'detected' if not errors_found else 'NOT detected'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check")
    p.add_argument("run")
    p.add_argument("--files", type=int)
    p = sub.add_parser("corrupt")
    p.add_argument("run")
    p.add_argument("out")
    args = parser.parse_args()
    if args.command == "check":
        check(args.run, args.files)
    else:
        corrupt(args.run, args.out)
    return 1 if errors_found else 0


if __name__ == "__main__":
    sys.exit(main())
