"""The run executor and its cache: many experiments at once, each cached by config hash (``pool.run_all``), and
sweeps over a grid built on it. Below the doctor (``fedgap.diagnose``), above the single run
(``fedgap.experiment``)."""
