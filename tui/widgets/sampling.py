"""The sampling panel: every generation setting, checked as it is typed by SamplingParams itself."""

from __future__ import annotations

from textual import on
from textual.containers import VerticalScroll
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widgets import Input, Label, Select, Static, TextArea

from gpt.errors import KettleError
from gpt.sampling import PARAMS, PRESETS, SamplingParams, get_preset
from tui.widgets.blink import RestingInput, RestingTextArea

# What the panel edits, in order: every parameter with a label (gpt.sampling.PARAMS). A blank
# optional one (the seed) means None ("a new one each time").
FIELDS = [param for param in PARAMS if param.label]
CUSTOM = "custom"


def parse_field(name: str, text: str):
    """The typed text as the field's value; ValueError with a readable reason if it is not one."""
    param = next(p for p in FIELDS if p.name == name)
    text = text.strip()
    if param.optional and not text:
        return None
    try:
        return param.kind(text)
    except ValueError:
        kind = "a whole number" if param.kind is int else "a number"
        raise ValueError(f"{name} must be {kind}, got {text!r}") from None


class ParamValidator(Validator):
    """One field, checked by the same rule the engine uses (SamplingParams.validate)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def validate(self, value: str) -> ValidationResult:
        try:
            SamplingParams(**{self.name: parse_field(self.name, value)}).validate()
        except (ValueError, KettleError) as exc:
            return self.failure(str(exc))
        return self.success()


def _shown(value) -> str:
    return "" if value is None else str(value)


class SamplingPanel(VerticalScroll):
    """Posts `Changed` with the full, valid settings after each accepted edit; invalid text is
    marked, explained under the field, and never leaves the panel."""

    class Changed(Message):
        def __init__(self, params: SamplingParams, system_prompt: str):
            super().__init__()
            self.params = params
            self.system_prompt = system_prompt

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.params = get_preset("balanced")
        self._system = ""

    def compose(self):
        yield Static("[b]Sampling[/]  [dim]ctrl+s hides[/]", classes="panel-title")
        yield Label("Preset")
        yield Select(
            [(name, name) for name in PRESETS] + [("custom", CUSTOM)], value="balanced", allow_blank=False, id="preset"
        )
        for param in FIELDS:
            yield Label(param.label)
            yield RestingInput(
                id=f"param-{param.name}",
                validators=[ParamValidator(param.name)],
                validate_on=["changed", "submitted"],
                compact=True,
            )
            yield Static("", id=f"error-{param.name}", classes="field-error")
        yield Label("System prompt")
        yield RestingTextArea(id="system-prompt", soft_wrap=True, tab_behavior="focus")

    def on_mount(self) -> None:
        self.show(self.params, self._system)

    def show(self, params: SamplingParams, system_prompt: str) -> None:
        """Load a conversation's settings into the fields. The fields' change events that this
        causes carry the same values, so they post no Changed."""
        self.params = params
        self._system = system_prompt
        for param in FIELDS:
            self.query_one(f"#param-{param.name}", Input).value = _shown(getattr(params, param.name))
            self.query_one(f"#error-{param.name}", Static).update("")
        self.query_one("#system-prompt", TextArea).text = system_prompt
        self.query_one("#preset", Select).value = self._preset_of(params)

    @staticmethod
    def _preset_of(params: SamplingParams) -> str:
        for name in PRESETS:
            preset = get_preset(name)
            if all(getattr(preset, p.name) == getattr(params, p.name) for p in FIELDS if p.name != "seed"):
                return name
        return CUSTOM

    def errors(self) -> list[str]:
        """The reasons the typed settings are refused, one per bad field (empty when all good)."""
        out = []
        for param in FIELDS:
            result = ParamValidator(param.name).validate(self.query_one(f"#param-{param.name}", Input).value)
            if not result.is_valid:
                out.extend(result.failure_descriptions)
        return out

    @on(Input.Changed)
    def _field_changed(self, event: Input.Changed) -> None:
        name = (event.input.id or "").removeprefix("param-")
        error = self.query_one(f"#error-{name}", Static)
        if event.validation_result is not None and not event.validation_result.is_valid:
            error.update(event.validation_result.failure_descriptions[0])
            return
        error.update("")
        params = SamplingParams(**{**self.params.to_dict(), name: parse_field(name, event.value)})
        if params == self.params:
            return
        self.params = params
        self.query_one("#preset", Select).value = self._preset_of(params)
        self._post()

    @on(Select.Changed, "#preset")
    def _preset_chosen(self, event: Select.Changed) -> None:
        if event.value == CUSTOM or event.value == self._preset_of(self.params):
            return
        self.show(get_preset(str(event.value)).replace(seed=self.params.seed), self.system_prompt)
        self._post()

    @on(TextArea.Changed, "#system-prompt")
    def _system_changed(self) -> None:
        if self.system_prompt != self._system:
            self._system = self.system_prompt
            self._post()

    @property
    def system_prompt(self) -> str:
        return self.query_one("#system-prompt", TextArea).text

    def _post(self) -> None:
        if not self.errors():
            self.post_message(self.Changed(self.params, self.system_prompt))
