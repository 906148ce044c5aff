"""The command-line tools, installed as console scripts (setup.cfg) and mirrored by the top-level scripts.

vadusa-decode       = decode.py          synthesise speech, or --compare (the A/B harness)
vadusa-train-heads  = train_heads.py     train draft heads / the feature drafter, accuracy, trees
vadusa-train-block  = train_block.py     block distillation
vadusa-build-demo   = scripts/build_demo.py   rebuild the shipped demo TTS
"""
