"""The run's own machinery: what a training run is configured with and where it leaves its traces.

`config` (the typed, frozen `Config`: every flag, default and environment variable declared on its
field), `folder` (the run folder, `run.json`, `latest.json`), `lease` (one writer per run folder),
`callbacks` (NaN stop, backups, preemption, progress lines shared by every `fit`), `distribution`
(the `tf.distribute` strategy) and `tracking` (W&B, or a no-op). Nothing here imports the model,
evaluation or compression; `config` takes its defaults from `utilities.data` (image size, manifest path).
"""
