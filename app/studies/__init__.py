"""Studies around the product, apart from its stages: the benchmark (`bench`), the throughput
measurement (`perf`) and the noisy-dataset maker (`make_noisy`). Each is `python -m app NAME`."""
