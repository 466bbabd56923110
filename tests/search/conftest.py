from tests.bench.conftest import tiny_task_dir  # noqa: F401 - shared fixture
