"""stockfedavg: a stock Flower FedAvg app, the baseline Fedward's round time is compared with."""
