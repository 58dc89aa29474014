"""Checkpoints of linear evaluation and fine-tuning: pretraining's Checkpointer, plus what an
evaluation adds to it.

`train_classifier` (drivers.py) saves its `EvalState` (head, encoder when fine-tuning, BatchNorm
statistics, optimizer state, step) through `checkpointing.Checkpointer` into
`EVAL_WORKDIR/checkpoints`, every `checkpoint_every_steps` / `checkpoint_every_secs` and on
SIGTERM / SIGINT (`checkpointing.SaveSchedule`), and resumes from the latest good checkpoint:
the same atomic Orbax writes, SHA-256 digests, fallback past corrupt checkpoints, workdir lock
and free-space check as pretraining. Nothing else is needed to continue exactly:

* the training batches are a pure function of (seed, step, process) (`datasets.
  linear_eval_batches(start_step=...)`: example order and every crop / flip draw), and a
  semi-supervised subset is a pure function of the seed;
* the head's only random draw is its initialisation from PRNGKey(seed), which a resumed run
  replaces by the restored head; the step draws nothing; the LR schedule is a function of the
  step;
* no features are cached: every step runs the (frozen or trained) encoder on that step's
  augmented crops, which differ every epoch, and the final evaluation recomputes everything
  from the restored state.

What is added here:

* `checkpoint_config`: the evaluation config the checkpoints are written with, plus the
  SHA-256 digest of the pretrained encoder (parameters and BatchNorm statistics) they were
  trained from, so that a resume never mixes a classifier trained on one encoder with another
  (`check_same_encoder` says so in one line; the path may differ, e.g. an export of the same
  step or a moved workdir, the digest may not);
* `forget_logged_after`: the metric rows a resumed run writes again (the same rule as
  main_loop's for pretraining, for the evaluation's `train_` / `<split>_` rows).
"""

import jax

from byol_jax.runtime import checkpointing, integrity, metrics

ENCODER_KEY = 'pretrained_encoder'


def encoder_digest(params, bn_state) -> str:
  return integrity.tree_digest(dict(params=params, state=bn_state))


def checkpoint_config(config, params, bn_state):
  """`config` with `pretrained_encoder.sha256`: what the checkpoints store and are compared on."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config[ENCODER_KEY] = dict(sha256=encoder_digest(params, bn_state))
  return config


def check_same_encoder(workdir: str, config):
  """Raises CheckpointError (one line) when `workdir` holds evaluation checkpoints trained from
  another pretrained encoder than `config`'s (`checkpoint_config`); unless
  `restart_from_scratch`, which lets the Checkpointer move them aside."""
  if config.restart_from_scratch:
    return
  try:
    _, saved = checkpointing.read_saved_config(workdir)
  except (FileNotFoundError, checkpointing.CheckpointError):
    return  # Nothing readable to resume: the Checkpointer reports or starts afresh.
  before = (saved.get(ENCODER_KEY) or {}).get('sha256')
  now = config[ENCODER_KEY]['sha256']
  if before is not None and before != now:
    raise checkpointing.CheckpointError(
        f'The evaluation checkpoints in {workdir} were trained on another pretrained encoder '
        f'({saved.get("checkpoint")}, {before[:19]}...) than --config.checkpoint='
        f'{config.checkpoint} gives now ({now[:19]}...): not mixing them. Pass the original '
        f'--config.checkpoint, use a new --workdir, or --config.restart_from_scratch=True to '
        f'move the old checkpoints aside.')


def forget_logged_after(workdir: str, step: int) -> int:
  """Drops the rows of WORKDIR/metrics.jsonl logged after the checkpoint of `step` was saved
  (the resumed run, or at step 0 the fresh one, logs them again; main_loop does the same for
  pretraining): those of later steps, and at `step` itself every row but training's (logged
  before the save; the evaluation row of the final step comes after it). Call it before the
  MetricWriter opens the file; its `restart(step)` tells TensorBoard the same."""
  def after(row):
    logged = row.get('step', 0)
    return logged > step or (logged == step and not any(k.startswith('train_') for k in row))
  dropped = metrics.drop_rows(workdir, after)
  if dropped and jax.process_index() == 0:
    print(f'metrics.jsonl: dropped {dropped} rows logged after step {step}; they are logged '
          f'again as the run repeats those steps.', flush=True)
  return dropped
