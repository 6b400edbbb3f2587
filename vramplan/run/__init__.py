"""vramplan.run: what `vramplan run` and `vramplan calibrate` do (docs/run.md, docs/contracts.md).

run_dir.py           the default run dir: ./runs/<model>-<recipe>-<UTC time>
launch.py            plan -> launch command, environment, launch.sh
process.py           the trainer as a process group: start it, forward Ctrl-C, wait
attempts.py          the attempt loop: attempt dirs, attempts.json, classify the end, OOM fallbacks
progress.py          live progress from the trainer's metrics.jsonl
report.py            report.json: the final attempt measured against its estimate
calibration_math.py  measured vs estimated rows and correction factors (pure functions)
calibration.py       run dirs -> rows; calibration files (write_calibration, load_calibration)
"""
