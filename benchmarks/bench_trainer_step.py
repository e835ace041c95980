"""The real `CIRTrainer` stage-2 step against its floor, and length-grouped batches against random ones, all in one
process and alternating, so that every number sees the same machine load.

    python -m benchmarks.bench_trainer_step [--rows 384] [--batch 64] [--bank 20000] [--rounds 1] [--json OUT]

Geometry: CLIP4CIR with OpenAI's RN50x4 (text tower 640 wide, 12 layers, 10 heads, vocabulary 49,408; the image
tower built but frozen, as in stage 2), random weights, CPU fp32, 2 threads. The optimizer settings are those of
`examples/configs/clip4cir_fiq_stage2.json` (fused AdamW over every trainable parameter, no clipping, constant
learning rate). A bank of `--bank` random 640-d candidates; `--rows` triplets whose modification texts are real
FashionIQ caption pairs (joined at random, as in training) and CIRR captions (`benchmarks/data/cir_texts.json`),
tokenized with CLIP's BPE (`benchmarks/data/clip_bpe/`, the merges those texts use), so the token lengths are
the real ones.

A round trains one epoch of the rows three ways, alternating step by step so that only one of them runs at any time
and all see the same machine load: a Trainer step with random batches, the floor on the very same batch (after the
Trainer's step on even steps, before it on odd ones), and a step of a second Trainer (in a thread, waiting for its
turn) with length-grouped batches over the same rows. The
floor is the maths of the step and nothing else: the text tower's forward and backward (with the sum fusion and the
normalization), the bank matmul and cross-entropy, and the fused AdamW step on the trainable parameters, on the
tensors the collator made and on the Trainer's own weights. A Trainer step is timed from the end of the previous
one (or the start of the epoch) to its end: the dataloader, the collator, the Trainer's loop and its callbacks
included. A first round of one step each is not counted (the process's first touch of the activations' and the
optimizer's memory); every later step is.

Cost: about 2.5 x (rows / batch + 1) Trainer steps (7 random + 7 floor + 7 shorter grouped ones by default): 8.5
minutes on the 2-core machine with a load average of 10 from other jobs.

Times are CPU seconds of the process (`time.process_time`: every thread's), not wall seconds: on the shared 2-core
machine the wall time of one 40-second step moves by 2-3x with the other jobs' load, the CPU time it takes far
less; the wall-time ratios are reported beside them.

`--json OUT` writes `{"trainer_over_floor", "grouped_speedup", "trainer_over_floor_wall", "grouped_speedup_wall",
"trainer_s_per_sample", "floor_s_per_sample", "grouped_s_per_sample", "padded_tokens_per_row",
"grouped_padded_tokens_per_row", "real_tokens_per_row", "steps", "step_s", "conditions"}`: `trainer_over_floor` = the
Trainer's time per sample over its floor's (random batches), `grouped_speedup` = the Trainer's time per sample with
random batches over that with length-grouped batches; `step_s` has every timed step's wall and CPU seconds.
"""

import os

# Before torch loads OpenMP: threads that wait at a barrier sleep instead of spinning. With other jobs on the two
# cores, a spinning thread burns its core while its partner waits to be scheduled (20x the step's CPU time in a
# test), which is neither the Trainer's cost nor the floor's; sleeping costs both the same microseconds.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from benchmarks.bench_stages import GEOMETRIES

DATA = Path(__file__).parent / "data"
CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "clip4cir_fiq_stage2.json"
OPTIMIZER_KEYS = ("learning_rate", "temperature", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
                  "max_grad_norm", "decay_norms_and_biases", "lr_scheduler_type", "warmup_steps", "seed")


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = json.loads((DATA / "clip_bpe" / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (DATA / "clip_bpe" / "merges.txt").read_text().splitlines() if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def triplets(rows: int, bank_size: int, seed: int = 0):
    """`rows` triplets over a bank of `bank_size` ids: FashionIQ caption pairs and CIRR captions in the sample's
    proportion (3:1), random reference and target ids."""
    import datasets

    texts = json.loads((DATA / "cir_texts.json").read_text())
    pool = [list(pair) for pair in texts["fashioniq"]] + [[c] for c in texts["cirr"]]
    rng = random.Random(seed)
    chosen = [pool[i % len(pool)] for i in rng.sample(range(max(rows, len(pool))), rows)]
    return datasets.Dataset.from_dict({
        "reference_id": [f"img{rng.randrange(bank_size)}" for _ in range(rows)],
        "target_id": [f"img{rng.randrange(bank_size)}" for _ in range(rows)],
        "modification_texts": chosen, "source": ["annotated"] * rows})


def bank_of(bank_size: int, dim: int):
    from trainers.candidate_bank import CandidateBank

    g = torch.Generator().manual_seed(0)
    references = torch.randn(bank_size, dim, generator=g)
    return CandidateBank([f"img{i}" for i in range(bank_size)], F.normalize(references, dim=-1), references, {})


class _Recorder:
    """The trainer's collator, keeping what it returns (the floor runs on the same batches; nothing mutates them)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, rows):
        batch = self.collate(rows)
        self.batches.append(batch)
        return batch


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class _Times:
    """Wall and CPU seconds of each timed step."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def add(self, start: tuple[float, float]) -> None:
        wall, cpu = _now()
        self.wall.append(wall - start[0])
        self.cpu.append(cpu - start[1])


class _Clock(TrainerCallback):
    """Times each Trainer step: from the end of the previous one (or the epoch's start) to its end, less what runs
    between them (`after(step, last)`, which this callback calls at each step's end). While `warm_up`, a step is not
    counted and is the last of the run."""

    def __init__(self, after):
        self.after, self.times, self.warm_up = after, _Times(), False

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.mark = _now()

    def on_step_end(self, args, state, control, **kwargs):
        if self.warm_up:
            control.should_training_stop = True
        else:
            self.times.add(self.mark)
        self.after(state.global_step - 1, last=control.should_training_stop or state.global_step >= state.max_steps)
        self.mark = _now()


class _Turns:
    """The grouped trainer trains in a second thread, one step per turn, between the random-batch trainer's steps:
    the three measurements alternate step by step (random, floor, grouped, random, ...), and only one of them
    runs at any time."""

    def __init__(self, trainer):
        self.trainer, self.error = trainer, None
        self.go, self.done = threading.Event(), threading.Event()
        self.clock = _Clock(self._yield)
        trainer.add_callback(self.clock)

    def _yield(self, step, last):
        self.done.set()
        if not last:
            self._wait(self.go)

    @staticmethod
    def _wait(event):
        event.wait()
        event.clear()

    def _run(self):
        try:
            self._wait(self.go)
            self.trainer.train()
        except Exception as error:  # noqa: BLE001 - any failure is handed to the main thread, which raises it
            self.error = error
            self.done.set()

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def step(self):
        """Let the grouped trainer take one step; return when it has."""
        self.go.set()
        while not self.done.wait(1.0):
            if not self.thread.is_alive():  # it has no step left
                break
        self.done.clear()
        if self.error is not None:
            raise self.error

    def join(self):
        self.thread.join()


class _Floor:
    """The step's maths on the trainer's own model (its own AdamW): query side forward + backward, bank scores,
    cross-entropy, the optimizer step. Not on a copy: a deep copy's weights sit elsewhere in memory, and in a 3-layer
    test that alone made the floor 6-7% faster than the Trainer (the same code on the same weights: 1.00x)."""

    def __init__(self, model, bank, config, recorder):
        self.model, self.recorder, self.times = model, recorder, _Times()  # the trainer's own weights
        self.bank, self.tau = bank.to(torch.float32), config["temperature"]
        self.optimizer = torch.optim.AdamW(self.model.query_side_parameters(), lr=config["learning_rate"],
                                           betas=(config["adam_beta1"], config["adam_beta2"]),
                                           eps=config["adam_epsilon"], weight_decay=config["weight_decay"], fused=True)

    def __call__(self, step: int, record: bool = True):
        batch = self.recorder.batches[step]
        start = _now()
        query = self.model.get_query_embeds(batch["input_ids"], batch["attention_mask"],
                                            reference_features=batch["reference_features"])
        F.cross_entropy(query @ self.bank.T / self.tau, batch["target_index"]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.times.add(start)


def trainer_for(model, processor, bank, train, config, batch, grouped, out):
    from trainers.cir_trainer import CIRTrainer, CIRTrainingArguments

    args = CIRTrainingArguments(
        output_dir=str(out), stage="candidate_bank", per_device_train_batch_size=batch, num_train_epochs=1,
        dataloader_drop_last=True, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        logging_strategy="no", group_by_text_length=grouped, **config)
    return CIRTrainer(model, args, train_dataset=train, processor=processor, bank=bank)


def padded_tokens(batches) -> float:
    return sum(b["input_ids"].numel() for b in batches) / sum(len(b["input_ids"]) for b in batches)


def _ratio(numerator: list[float], denominator: list[float]) -> float:
    return sum(numerator) / len(numerator) / (sum(denominator) / len(denominator))


def _setup(rows, batch, bank_size, out):
    """The two trainers (random and length-grouped batches, the same weights and rows), their collators recorded,
    and the floor on a copy of the random trainer's model."""
    from modeling_spn4cir import (
        CLIP4CIRConfig,
        CLIP4CIRImageProcessor,
        CLIP4CIRModel,
        CLIP4CIRProcessor,
    )

    config = {k: v for k, v in json.loads(CONFIG.read_text()).items() if k in OPTIMIZER_KEYS}
    geometry = GEOMETRIES["RN50x4 @288"]
    processor = CLIP4CIRProcessor(image_processor=CLIP4CIRImageProcessor(size=288), tokenizer=clip_tokenizer())
    bank, train = bank_of(bank_size, geometry["projection_dim"]), triplets(rows, bank_size)
    torch.manual_seed(0)
    model = CLIP4CIRModel(CLIP4CIRConfig(**geometry))
    # both trainers on copies made the same way (memory laid out alike), the template freed
    plain = trainer_for(copy.deepcopy(model), processor, bank, train, config, batch, False, Path(out) / "plain")
    grouped = trainer_for(copy.deepcopy(model), processor, bank, train, config, batch, True, Path(out) / "grouped")
    del model
    recorders = {"plain": _Recorder(plain.data_collator), "grouped": _Recorder(grouped.data_collator)}
    plain.data_collator, grouped.data_collator = recorders["plain"], recorders["grouped"]
    return config, plain, grouped, recorders, _Floor(plain.model, bank.target_embeds, config, recorders["plain"])


def run(rows=384, batch=64, bank_size=20000, rounds=1, out=None):
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        config, plain, grouped, recorders, floor = _setup(rows, batch, bank_size, tmp)
        turns = _Turns(grouped)

        floored = set()

        def after_plain_step(step, last):
            # T0 F0 G0 F1 | T1 G1 | T2 F2 G2 F3 | T3 ...: the floor runs after its Trainer step on even steps and before
            # it on odd ones (the dataloader has collated the next batch already), so neither gains from following the
            # other on the very same batch
            if (step, clock.warm_up) not in floored:
                floor(step, record=not clock.warm_up)
            turns.step()
            if step % 2 == 0 and not last and len(recorders["plain"].batches) > step + 1:
                floor(step + 1, record=not clock.warm_up)
                floored.add((step + 1, clock.warm_up))

        clock = _Clock(after_plain_step)
        plain.add_callback(clock)
        for r in range(-1, rounds):  # round -1: one step of each, not counted (first-touch memory, lazy state)
            clock.warm_up = turns.clock.warm_up = r < 0
            for recorder in recorders.values():
                recorder.batches.clear()
            floored.clear()
            turns.start()
            plain.train()
            turns.join()
            if r >= 0:
                print(f"round {r + 1}/{rounds}: CPU s per step: trainer {_ratio(clock.times.cpu, [1]):.1f}, floor "
                      f"{_ratio(floor.times.cpu, [1]):.1f}, grouped {_ratio(turns.clock.times.cpu, [1]):.1f} "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        lengths = plain.training_texts.row_lengths(0).float().mean().item()
    times = {"trainer": clock.times, "floor": floor.times, "grouped": turns.clock.times}
    result = {
        "trainer_over_floor": _ratio(clock.times.cpu, floor.times.cpu),
        "grouped_speedup": _ratio(clock.times.cpu, turns.clock.times.cpu),
        "trainer_over_floor_wall": _ratio(clock.times.wall, floor.times.wall),
        "grouped_speedup_wall": _ratio(clock.times.wall, turns.clock.times.wall),
        **{f"{name}_s_per_sample": _ratio(t.cpu, [batch]) for name, t in times.items()},
        "padded_tokens_per_row": padded_tokens(recorders["plain"].batches),
        "grouped_padded_tokens_per_row": padded_tokens(recorders["grouped"].batches),
        "real_tokens_per_row": lengths,
        "steps": {name: len(t.cpu) for name, t in times.items()},
        "step_s": {name: {"wall": t.wall, "cpu": t.cpu} for name, t in times.items()},
        "conditions": {"rows": rows, "batch": batch, "bank": bank_size, "rounds": rounds,
                       "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                       "date": time.strftime("%Y-%m-%d %H:%M"), "config": CONFIG.name, **config},
    }
    print(f"trainer / floor: {result['trainer_over_floor']:.3f} (wall {result['trainer_over_floor_wall']:.3f})   "
          f"random / grouped batches: {result['grouped_speedup']:.2f}x (wall {result['grouped_speedup_wall']:.2f}x)   "
          f"padded tokens per row {result['padded_tokens_per_row']:.1f} vs {result['grouped_padded_tokens_per_row']:.1f}"
          f" (real {lengths:.1f})   load {os.getloadavg()}")
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=384, help="triplets (one epoch per round and trainer)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bank", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    run(args.rows, args.batch, args.bank, args.rounds, args.json)
