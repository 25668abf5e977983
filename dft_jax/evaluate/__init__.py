"""Evaluation: in-domain accuracy, math answers (math-verify), forgetting, target probabilities.

Suites (config.eval.suites / `--suite`, comma-separated):
  in_domain     the held-out built-in problems (eval.in_domain, default builtin:arith_test): greedy
                accuracy (the reply's final `#### N`, else `\\boxed{N}`, else 'answer is N', equals
                the reference number); with samples k > 1, k replies per problem at `temperature`:
                avg@k = mean accuracy over all replies, pass@k = share of problems with a right
                reply among the k (unbiased estimator, arXiv 2107.03374).
  math          rows in MATH500 format {problem, answer} (eval.math_file): the reply's boxed / LaTeX
                answer checked against `answer` by math-verify (symbolic equivalence), under the
                system prompt both the DFT (arXiv 2508.05629) and PSFT (arXiv 2508.17784) papers
                evaluate with (MATH_SYSTEM_PROMPT); greedy, plus avg@k / pass@k as above.
  forgetting    KL(base || model) = mean_t sum_v pi_base(v|.) [log pi_base(v|.) - log pi(v|.)]
                and the model's entropy H = mean_t -sum_v pi(v|.) log pi(v|.), both teacher-forced
                on the base model's greedy replies to the general prompts; factual QA accuracy (an
                alias of the answer appears in the greedy reply); perplexity
                exp(mean_t -log pi(x_t|x_<t)) on held-out prose (and KL to the base there).
  target_probs  pi(y_t | y_<t, x) teacher-forced on the held-out in-domain reference responses: its
                histogram over objectives.HIST_EDGES, mean and mean NLL -- the before / after
                picture of the DFT paper, on data the run never trained on.

Sets (eval.sets, sets.py): any number of the user's own sets, each `NAME=SOURCE[,FIELD=VALUE...]`
with its own format and field names like data.*, and a kind: answers (greedy replies checked by
math-verify), forced (teacher-forced target probability, NLL, histogram), kl (KL to the base,
entropy, perplexity on its text); their metrics are `NAME/...` in the results, `eval/NAME/...` in
the metric writers (writer_metrics). The sets of the suites take the same `SOURCE[,FIELD=VALUE]`.

A model evaluated against itself has KL 0. Results are one flat dict of numbers (plus "samples"):
`RunEvaluator(eval_cfg, data_cfg, tokenizer, graphdef, base_params)(params)`, which the train job
calls before and after training and the scanner study once per run; eval_cfg is config.eval,
whose fields and defaults are those of configs/default.py.

Modules: answers (math-verify, accuracy, pass@k), generation (batched sampling), teacher_forced
(logp, entropy, KL through the chunked LM head), sets (evaluation sets: sources, fields, checks),
evaluator (RunEvaluator, results table), cli (`python -m dft_jax.evaluate`).
"""
from dft_jax.evaluate.evaluator import (ROWS, SUITES, RunEvaluator, check_sets, format_sections,
                                       format_table, settings, table_sections, writer_metrics)

__all__ = ["ROWS", "SUITES", "RunEvaluator", "check_sets", "format_sections", "format_table",
           "settings", "table_sections", "writer_metrics"]
