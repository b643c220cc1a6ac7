"""The demo page: `python app.py [--model FOLDER_OR_HUB_ID] [--clip_model CLIP]`, the same as `vitgpt2 demo`; see
modeling_vitgpt2/applications/demo.py.

At the top of the checkout because that is where a Hugging Face Space looks for its app; the Space pushed by
`vitgpt2 hub space` runs this same file.
"""

import sys

try:
    from modeling_vitgpt2.applications.demo import main
except ModuleNotFoundError as error:
    if error.name != "gradio":
        raise
    print("app.py: error: the demo needs Gradio, the [demo] extra: pip install \"modeling-vitgpt2[demo]\"",
          file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
