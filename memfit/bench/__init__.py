"""The benchmarks behind `memfit bench NAME` (memfit/commands/bench.py dispatches to them).

    continual  memfit.bench.continual   continual learning of new facts: sparse memory finetuning
                                        against full finetuning, LoRA, ablations and BM25 retrieval
               .continual_stream        its configuration, model under test, learners, one stream
               .continual_report        its summaries, aims and targets, results.md, plots
               memfit.bench.baselines   the baselines it compares with (peft, rank_bm25: the [bench] extra)
    update     memfit.bench.update      end-to-end update latency through a live `memfit serve`
    serve      memfit.bench.serve       generation throughput and latency of the engine
    swap       memfit.bench.swap        publish and hot-swap cost of the store and the live tables

Each module has `run(args) -> int`. They sit above every library package (they drive memlm, the store,
the workers and the service) and import only what they use, lazily where it is heavy; the runtime
install never imports them. Standalone scripts and committed results live in benchmarks/.
"""
