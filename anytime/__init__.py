"""Anytime prediction (DESIGN.md step 10), one concept a module (exit heads are bank slots: `ensemble.exits`).

* `costs`: FLOPs per step, of a member's own forward, cumulative along a schedule;
* `schedule`: the schedules (`member`, `explicit`, `greedy`) named by `[anytime] schedule`;
* `combine`: the plain combiner (mean of the started members' latest-exit softmax, `ensemble.metrics.combine`)
  and `Combiner`, the record's fitted one (per-exit temperatures, per-prefix mix, calibration);
* `fit`: fitting the `Combiner` on validation data (never loses accuracy along the schedule; temperature scaling);
* `early_exit`: per-input early exit: confidence, the threshold table fitted for target mean FLOPs;
* `record`: the anytime record (anytime.json): computed, written after training, checked on load;
* `store`: a checkpoint with its record, and the checks/hashes of the files a server loads;
* `budget`: the typed budget (`FlopsBudget`, `DeadlineBudget`, none) a prediction may spend;
* `predictor`: `AnytimePredictor`, the longest schedule prefix within a budget;
* `evaluate`: accuracy/NLL/ECE vs cumulative FLOPs, the budgeted-batch curve, member subsets, exits
  (`superweights evaluate`); `report` writes its files (CSVs, PNG, summary) and console table;
* serving: `serving_predictor` (step times per batch bucket), `batching` (micro-batches of equal budgets),
  `serve_schemas` (the one request schema, parsing, client errors), `serve_service` (`AnytimeService`,
  `ServeSettings`), `http_app` (the FastAPI app), `serve_thread` (uvicorn in a thread, tests/benchmarks).
"""
