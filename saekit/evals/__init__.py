"""The evaluation suite: which dictionary is better, with error bars. Core metrics live in evaluate.py; here
sparse probing, feature absorption and targeted probe perturbation (SAEBench's definitions, bootstrap intervals
over held-out documents or words), the suite runner and its report, sweeps and their comparison."""
