"""The web demo: type a text, hear AR and accelerated decoding side by side, see what each pass accepted.

    pip install ".[app]"          # gradio
    python app.py [--port 7860] [--host 127.0.0.1] [--model-dir DIR] [--threads 1] [--share]

The page (vadusa/web.py) runs the selected decoders in turn on the demo TTS (or weights from --model-dir).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from vadusa.cli import Parser, positive_int, reports_user_errors
from vadusa.speech import TTSPipeline


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--model-dir", type=Path, default=None, help="demo weights directory (default: shipped)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument(
        "--stream-audio", action=argparse.BooleanOptionalAction, default=None,
        help="stream into the players (gradio needs ffmpeg for it; default: when ffmpeg is installed)",
    )  # fmt: skip
    return p.parse_args(argv)


def serve(args):
    """Load the pipeline, start the page's server in the background and return the gr.Blocks (`.close()` stops it)."""
    from vadusa.web import build_app

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    pipe = TTSPipeline.from_pretrained(args.model_dir)
    demo = build_app(pipe, args.stream_audio).queue()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True)
    return demo


@reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the web demo needs gradio: pip install ".[app]"', file=sys.stderr)
        return 2
    demo = serve(args)
    demo.block_thread()  # until Ctrl-C
    return 0


if __name__ == "__main__":
    sys.exit(main())
