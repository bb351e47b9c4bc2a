"""The benchmarks' default inputs are the shipped samples, found from the package's own location."""

from batch_engine.bench import million, pipeline


def test_the_benchmarks_find_the_shipped_samples() -> None:
    for samples in (pipeline.SAMPLES, million.SAMPLES):
        assert (samples / "nightly_tasks.json").is_file(), samples
        assert (samples / "config.toml").is_file(), samples


def test_the_emulator_cpu_bench_answers_every_row_alike_in_every_round() -> None:
    from batch_engine.bench.emulator_cpu import bench_emulator_cpu

    first, again = bench_emulator_cpu(100, 2), bench_emulator_cpu(100, 1)
    assert (first["batch_rows"], first["realtime_requests"]) == (90, 10)
    assert first["answers_digest"] == again["answers_digest"]  # answers alike, ids masked: versions can be compared
