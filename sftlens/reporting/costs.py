"""What a unit of work costs: the seconds per work item and per unit of each kind of step, measured on
this project's machine. The study's plan (`sftlens.study.engine.commands`) and the audit's
(`sftlens.audit.run`) estimate their time with them; a study's plan prefers its own finished units' rates."""

# Seconds per unit of work (one sampled continuation, training example, greedy answer, KL prompt) and
# per unit, for SmolLM2-135M in fp32 on a 2-core CPU: the rates of the `repro` run (2026-11-25, 102
# units in 50 min; units' work as `study plan` counts it). LoRA's: the `repairs` run of 2026-12-01 on a
# slower CPU, scaled by its ratios to that run's train (0.76) and repaired (0.96) rates. Inject's: train's (a statement is a short example).
# The tuned arm's units run the train and eval stages as they are (tune, tuned: SFT; tune-eval: greedy eval on
# dev), so they take those rates; a tuned unit linking its candidate plans no work. The guards' arm: train's rate per
# example read (a replaying run reads more: `sftlens.guards.guard_work`), LoRA's scoring rate for guard-eval. The
# guided repair's importance unit: eval's rate per greedy answer (the fine-tune on in-domain dev), and 12 s fixed for
# its forward and backward passes and its file (the guards study's three took 18-20 s each, 2026-12-06).
DEFAULT_RATES = {"probe": 0.040, "split": 0.0, "train": 0.14, "eval": 0.037, "kl": 0.02, "deltas": 16.0,
                 "restore": 0.047, "control": 0.045, "repair": 0.047, "repaired": 0.045, "lora": 0.11,
                 "lora-eval": 0.043, "inject": 0.14, "tune": 0.14, "tune-eval": 0.037, "tuned": 0.14,
                 "guard": 0.14, "guarded": 0.14, "guard-eval": 0.043, "importance": 0.037}
FIXED_SECONDS = {"probe": 5, "split": 2, "train": 8, "eval": 4, "kl": 3, "deltas": 0, "restore": 6, "control": 6,
                 "repair": 6, "repaired": 6, "lora": 8, "lora-eval": 6, "inject": 8, "tune": 8, "tune-eval": 4,
                 "tuned": 2, "guard": 8, "guarded": 8, "guard-eval": 6, "importance": 12}

# An audit's steps (`sftlens audit --plan`), measured from the per-step seconds an audit records
# (`DIR/audit.json` sessions[].steps) of `bench/audit_pair.py --facts-per-relation 42` (1,008 facts, probe 2
# templates x 2 samples of at most 8 tokens, answers of 16) at commit 66e44d8, alone: seconds per sample (142.3 s
# / 8,064; not per token: samples end at a newline or once they name the answer, so the testbed audit's 16-token
# samples took 15.3 ms each against these 8-token ones' 17.6), greedy answer (the two models' and every repair's, a model load
# included), KL forward pass (29.1 s / 2,016), edited model (a repair value applied in memory, its weight passes:
# from the repair steps' 252 + 4,236 answers and 18 + 6 edits, 70.6 s and 172.9 s), the whole update
# concentration step, and the guided repair's importances: a forward and backward per forgotten or learned dev
# fact (about train's rate per example) plus writing its file (two fp32 copies of the model; 6.7 s with 14 facts).
RATES_FROM = "SmolLM2-135M fp32, this project's 2-core Intel Xeon, bench/audit_pair.py of 2026-12-06"
AUDIT_RATES = {"probe": 0.0176, "answer": 0.038, "kl": 0.0144, "edit": 3.4, "deltas": 12.7, "importance": 0.15,
               "importance_file": 4.6}
