"""The demo page: `python app.py [--model FOLDER_OR_HUB_ID] [--clip_model CLIP]`; see modeling_vitgpt2/applications/demo.py.

At the top of the checkout because that is where a Hugging Face Space looks for its app; the Space pushed by
`python -m modeling_vitgpt2.applications.hub space` runs this same file.
"""

try:
    from modeling_vitgpt2.applications.demo import main
except ModuleNotFoundError as error:
    if error.name != "gradio":
        raise
    raise SystemExit("app.py needs Gradio, the [demo] extra: pip install -e \".[demo]\"") from None

if __name__ == "__main__":
    main()
