"""The benchmarks' default inputs are the shipped samples, found from the package's own location."""

from batch_engine.bench import million, pipeline


def test_the_benchmarks_find_the_shipped_samples() -> None:
    for samples in (pipeline.SAMPLES, million.SAMPLES):
        assert (samples / "nightly_tasks.json").is_file(), samples
        assert (samples / "config.toml").is_file(), samples
