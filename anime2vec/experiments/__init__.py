"""Experiments on public benchmarks outside the MyAnimeList pipeline (e.g. `citeulike`)."""
