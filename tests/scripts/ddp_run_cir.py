"""Run under torchrun (2 gloo ranks): `ddp_run_cir.py MODEL_DIR DATA_DIR OUT`. `examples/run_cir.py` end to end under
DDP with SPN's two new options: stage 1 with the `target` + `text` negative types, then stage 2 from it with the
train split's images in no triplet appended to the bank as extra negatives. Each run writes OUT/<stage>/."""

import faulthandler
import json
import os
import sys
from pathlib import Path


def main(model_dir, data_dir, out):
    import run_cir

    faulthandler.dump_traceback_later(float(os.environ.get("SPN4CIR_TEST_WATCHDOG_S", "150")), exit=True)
    common = ["--dataset", data_dir, "--do_train", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
              "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
              "--ddp_backend", "gloo"]
    stage1 = Path(out) / "stage1"
    run_cir.main(["--model_name_or_path", model_dir, "--stage", "in_batch", "--negative_types", "target", "text",
                  "--output_dir", str(stage1), *common])
    run_cir.main(["--model_name_or_path", str(stage1), "--stage", "candidate_bank",
                  "--bank_extra_images", f"{data_dir}:train", "--bank_dir", str(Path(out) / "bank"),
                  "--output_dir", str(Path(out) / "stage2"), *common])
    import torch.distributed as dist  # the Trainer started the process group: say that both runs had two ranks

    if dist.get_rank() == 0:
        (Path(out) / "world.json").write_text(json.dumps({"world_size": dist.get_world_size()}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
