"""The recipe's settings (`RecipeConfig`), the rows of its ablation table and where their models are written."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field

KS = (1, 5, 10, 50)
ROWS = ("stage 1", "+N", "+N (LoRA)", "+P", "+P+N", "zero-shot")
MODEL_DIRS = {"stage 1": "stage1", "+N": "stage2_N", "+N (LoRA)": "stage2_N_lora", "+P": "stage1_P",
              "+P+N": "stage2_PN", "zero-shot": "zero_shot"}
CAPTIONERS = ("generative", "retrieval", "oracle")
NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75)


@dataclass
class RecipeConfig:
    output_dir: str = "outputs/spn_recipe"
    size: str = "default"  # benchmark size: "default" or "tiny"
    seed: int = 0
    temperature: float = 0.05
    stage0_epochs: int = 16
    stage0_lr: float = 1e-3
    stage1_epochs: int = 6
    stage1_lr: float = 2e-4
    stage1_batch_size: int = 64
    stage2_epochs: int = 3
    stage2_lr: float = 1e-4
    stage2_batch_size: int = 128
    # "+N (LoRA)": stage 2 with rank-r adapters on the text tower (same epochs and batch as +N); adapters usually
    # want a larger learning rate than full fine-tuning.
    lora_r: int = 8
    lora_lr: float = 1e-3
    rank_window: tuple[float, float] = (0.4, 0.8)  # fractions of the pool, like 10k-20k of FashionIQ's ~25k images
    k: int = 1  # generated targets per pool image: the original's generation commands all use k=1
    caption_phrases: int = 2  # phrases per retrieved caption
    # Who captions the pool for +P, +P+N and zero-shot: "generative" (the tiny LLaVA trained on `pretrain`, the
    # default), "retrieval" (the stage-1 model over the phrase vocabulary) or "oracle" (diagnostic only: the scene
    # graph, i.e. perfect captions).
    captioner: str = "generative"
    captioner_config: dict = field(default_factory=dict)  # overrides of generative_captioner.CaptionerConfig
    # overrides of generative_editor.EditorConfig: the --edit_writer_study diagnostic's editor, never the default's
    editor_config: dict = field(default_factory=dict)
    oracle_captions: bool = False  # the same as captioner="oracle"
    show_progress_bar: bool = True
    # 2: the steps run in two lanes, processes with one thread each (`lanes.run_steps`); 1: one process, the steps
    # in sequence (torch's own thread count)
    workers: int = 2
    model_sizes: dict = field(default_factory=lambda: dict(hidden=128, layers=4, text_layers=3, heads=4, patch=16))

    @classmethod
    def tiny(cls, output_dir: str, **kw) -> "RecipeConfig":
        """A ~1 minute run for tests: tiny benchmark, a couple of epochs per stage."""
        base = dict(output_dir=output_dir, size="tiny", stage0_epochs=2, stage1_epochs=2, stage2_epochs=1,
                    stage1_batch_size=16, stage2_batch_size=32,
                    model_sizes=dict(hidden=32, layers=2, text_layers=2, heads=2, patch=16),
                    captioner_config=dict(hidden=32, heads=2, vision_layers=1, text_layers=1, patch=16, epochs=1,
                                          batch_size=16, heldout=40),
                    editor_config=dict(hidden=32, heads=2, vision_layers=1, text_layers=1, epochs=1, batch_size=16,
                                       heldout=40, max_new_tokens=24))
        base.update(kw)
        return cls(**base)

    def __post_init__(self):
        if self.oracle_captions:
            self.captioner = "oracle"
        if self.captioner not in CAPTIONERS:
            raise ValueError(f"captioner must be one of {CAPTIONERS}, got {self.captioner!r}.")


def say(message: str) -> None:
    """Print a line of the recipe's log, naming the lane's process when it is not the main one."""
    name = multiprocessing.current_process().name
    print(f"[spn-recipe{'' if name == 'MainProcess' else ' ' + name}] {message}", flush=True)
