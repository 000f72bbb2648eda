"""The stage machinery: the runner, the run layout, completion markers, atomic storage, the accounting
of every key, the run-root lock, signals and retries."""
