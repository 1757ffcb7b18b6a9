"""A small web demo of a fill-mask model (Gradio), optionally beside a second model.

    python -m mlm.inference.app --model outputs/my-run [--compare bert-base-uncased] [--host 127.0.0.1] [--port 7860]

A text box (with [MASK] where the model should predict), the top-k tokens of each mask as bars, the joint fills
of all masks (predict.py's beam search), and, with --compare, the same for the second model side by side.
It serves on the loopback address by default; --host 0.0.0.0 shares it on the network. gradio is an optional
extra (requirements-extras.txt).
"""

from __future__ import annotations

import html
import os
import sys
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo

from mlm.common.cli import Parser, UserError, command_line  # noqa: E402
from mlm.inference.fill_mask import SAMPLE_SENTENCES, FillMask, Prediction, format_probability  # noqa: E402

CSS = """
.mlm-model { font-family: system-ui, sans-serif; }
.mlm-mask { margin: 0.6em 0 0.2em; font-weight: 600; }
.mlm-row { display: flex; align-items: center; gap: 0.5em; margin: 2px 0; }
.mlm-token { width: 9em; text-align: right; font-family: monospace; }
.mlm-bar { height: 1.1em; background: #f97316; border-radius: 3px; min-width: 2px; }
.mlm-score { font-size: 0.85em; color: #555; }
.mlm-fills td { padding: 2px 8px; } .mlm-error { color: #b91c1c; font-weight: 600; }
"""


def render(pred: Prediction) -> str:
    """One model's predictions as HTML: bars per mask, then the joint fills."""
    e = html.escape
    parts = [f'<div class="mlm-model"><h3>{e(pred.model)}</h3>']
    for n, mask in enumerate(pred.masks, 1):
        parts.append(f'<div class="mlm-mask">mask {n}</div>')
        for c in mask.candidates:
            parts.append(
                f'<div class="mlm-row mlm-candidate"><span class="mlm-token">{e(c.token)}</span>'
                f'<span class="mlm-bar" style="width:{max(c.score, 0.0) * 60:.2f}%"></span>'
                f'<span class="mlm-score">{format_probability(c.score)}</span></div>'
            )
    parts.append('<div class="mlm-mask">joint fills</div><table class="mlm-fills">')
    for f in pred.fills:
        parts.append(f'<tr class="mlm-fill"><td>{e(f.sequence)}</td><td>{format_probability(f.score)}</td></tr>')
    parts.append("</table></div>")
    return "".join(parts)


def predict_html(models: list[FillMask], text: str, top_k: int) -> list[str]:
    out = []
    for model in models:
        try:
            out.append(render(model.predict([text], top_k=int(top_k))[0]))
        except UserError as e:  # a text without a mask, too long...: said on the page, the server goes on
            out.append(f'<div class="mlm-error">{html.escape(str(e))}</div>')
    return out


def page_warnings(models: list[FillMask]) -> str:
    """What the server console says about a model (a fresh MLM head), on the page too."""
    return "\n".join(f"**Warning:** {m.warning}" for m in models if m.warning)


def build_demo(model: FillMask, compare: Optional[FillMask] = None):
    import gradio as gr

    models = [model] + ([compare] if compare else [])
    with gr.Blocks(title="mlm-ddp fill-mask") as demo:
        gr.Markdown("## Fill-mask\nWrite a sentence with `[MASK]` where the model should predict a word.")
        warnings = page_warnings(models)
        if warnings:
            gr.Markdown(warnings, elem_id="warnings")
        with gr.Row():
            text = gr.Textbox(label="Text", value=SAMPLE_SENTENCES[0], lines=2, elem_id="text", scale=4)
            top_k = gr.Slider(1, 20, value=5, step=1, label="top-k", elem_id="top_k", scale=1)
        button = gr.Button("Predict", variant="primary", elem_id="predict")
        with gr.Row():
            panes = [gr.HTML(elem_id=f"model-{i}") for i in range(len(models))]
        fn = lambda t, k: predict_html(models, t, k)  # noqa: E731
        button.click(fn, [text, top_k], panes)
        text.submit(fn, [text, top_k], panes)
    return demo


@command_line
def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(prog="python -m mlm.inference.app", description="A web page for fill-mask predictions (Gradio).")
    p.add_argument("--model", required=True, help="Run directory (its best/), saved model directory or Hub id.")
    p.add_argument("--compare", help="A second model shown side by side (e.g. the base model).")
    p.add_argument("--host", default="127.0.0.1", help="Address to serve on (default: loopback only).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N].")
    args = p.parse_args(argv)
    try:
        import gradio as gr
    except ImportError:
        raise UserError(
            "the web demo needs the optional package gradio; pip install -r requirements-extras.txt"
        ) from None
    model = FillMask(args.model, device=args.device)
    compare = FillMask(args.compare, device=args.device, flag="--compare") if args.compare else None
    demo = build_demo(model, compare)
    print(
        f"serving {model.name}{' and ' + compare.name if compare else ''} on http://{args.host}:{args.port}", flush=True
    )
    # System fonts: the default theme's web fonts would be fetched from the internet.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    try:
        demo.launch(
            server_name=args.host, server_port=args.port, share=False, theme=theme, css=CSS, show_error=True, quiet=True
        )
    except OSError as e:  # the port is taken, say
        raise UserError(f"cannot serve on {args.host}:{args.port} ({e}); choose another --port") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
