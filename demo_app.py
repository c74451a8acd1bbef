"""The SEED web demo: SEED-LLaMA chat with images in and out, and the tokenizer's round trip.

    python demo_app.py --llm tiny --config configs/seed2_tiny.yaml      # tiny random models, no downloads
    python demo_app.py --llm AILab-CVC/seed-llama-8b-sft               # SEED-LLaMA 8B (weights in pretrained/)
    python demo_app.py --llm AILab-CVC/seed-llama-14b-sft --load-in-8bit

Serves http://127.0.0.1:7860 (--host, --port; --share is off). See docs/web_demo.md.
"""

import sys

from seed.app import main

if __name__ == "__main__":
    sys.exit(main())
