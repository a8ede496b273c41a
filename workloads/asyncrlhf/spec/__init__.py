"""The sections of the AsyncRLHFJob spec, one module per part of the job.

`asyncrlhf.api` is the public face: it holds the resource itself (`AsyncRLHFJob`, `JobSpec`,
status, identity, immutable fields) and re-exports every model defined here, so callers import
`asyncrlhf.api` and never this package. The split keeps each part of the spec short enough to
read next to the documentation it becomes (every field description ends up in the CRD).

  base.py       SpecModel (camelCase aliases, unknown fields rejected), shared literals
  task.py       model, task (prompts, reward)
  algorithm.py  algorithm (loss), async (staleness, replay buffer)
  processes.py  generator, learner (and their pod resources)
  plumbing.py   weightSync (volume, snapshots), nats
  rules.py      cross-field constraints (Python checks and their CEL twins)

Nothing here imports `asyncrlhf.api`; `api` imports these modules.
"""
