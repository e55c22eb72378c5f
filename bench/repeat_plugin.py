"""pytest plugin for bench/sigkill_under_load.sh: ``-p bench.repeat_plugin --repeat N`` runs each
selected test N times in one session (the session's demo run is shared), as pytest-repeat would."""


def pytest_addoption(parser):
    parser.addoption("--repeat", type=int, default=1, help="run each selected test this many times")


def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("repeat")
    if n > 1:
        metafunc.fixturenames.append("repeat_index")
        metafunc.parametrize("repeat_index", range(1, n + 1))
