"""Train and evaluate a CIR model (SPN's two stages). Filled in by the CIRTrainer work; see README "Status"."""

import sys

if __name__ == "__main__":
    sys.exit("examples/run_cir.py: training and evaluation are not implemented yet (see README, Status).")
