"""`mnist-tune`: hyper-parameter search with Optuna, every trial in MLflow.

Workers (processes, on one machine or many) share a study through Optuna's database storage: unique
trial numbers, resumable studies, the trials of a dead worker failed through heartbeats. MLflow gets
one parent run per study and a child run `STUDY/trial-N` per trial; trials register no model and write
no pipeline outputs. The objective is the last epoch's validation accuracy: the test set is never read.
`space` reads what a study varies, `storage` opens Optuna's database, `study` runs the trials, `report`
shows them, `command` is the command line. docs/search.md says how to use it and why this storage.
"""
