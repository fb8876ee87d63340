"""Exit heads, step costs, schedules, the budgeted predictor, the evaluator and the HTTP app."""
