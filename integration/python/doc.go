// Package python holds the tests of the Python agent (python/phasecast)
// that go test runs, so that the README's one test command covers it too:
//
//   - TestPythonUnitTests runs the package's own unit tests
//     (python -m unittest discover -s python/tests) against the test
//     servers;
//   - TestMixedFleet runs Go novalike services and Python novalike.py
//     processes (python/examples/novalike.py) against one broadcaster,
//     through expand → migrate → contract → complete under load, and
//     counts every failed query on both sides and every Python agent's
//     acknowledgement in the store; a Python service holding a guard
//     open past the runner's --timeout makes it exit 2 naming that agent.
//
// The Python side runs on Debian's /usr/bin/python3 with python3-kombu,
// python3-psycopg2, python3-cryptography, python3-sqlalchemy and
// python3-eventlet. Without them the tests fail, never skip, and say what
// to install; so does a missing PostgreSQL or RabbitMQ.
package python
