import pytest

# the helpers' asserts are rewritten by pytest like the tests' own, so that they still check
# under python -O (make test runs the suite that way once); before any of them is imported
pytest.register_assert_rewrite("tests.factory", "tests.fakes", "tests.reliability")
