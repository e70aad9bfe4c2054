"""Fine-tune in one key: a sheet (base model, examples, method, estimated time) -> Start; then the
run's progress, ETA, live loss chart, tokens/s and Cancel; at the end the held-out losses, the
regression gate's verdict and an offer to switch to the new model.

The run is the separate process of finetune.jobs; this screen only follows the runs table."""

from __future__ import annotations

import asyncio
import math
import time

from rich.text import Text
from textual import on, work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Input, Label, ProgressBar, Select, Sparkline, Static
from textual.worker import WorkerState

from data.records import DataFilter, ModelVersion, Run
from data.store import Store
from finetune.plan import Plan, estimate_seconds, make_plan
from finetune.verdict import summary_lines
from gpt.errors import KettleError
from tui.errors import guarded
from tui.widgets.chat import counted
from tui.widgets.footer import KettleFooter

POLL_S = 0.5
# The loss chart draws an exponential moving average with this weight on the past: one batch's
# loss jumps with what is in it, which drowned the trend.
LOSS_SMOOTHING = 0.9
CURRENT = "current"  # the data choice "what would train now" (a snapshot of it is made at Start)


def smoothed(values: list[float], keep: float = LOSS_SMOOTHING) -> list[float]:
    """The exponential moving average of `values`, starting at the first."""
    out: list[float] = []
    for value in values:
        out.append(value if not out else keep * out[-1] + (1 - keep) * value)
    return out


def count(n: int) -> str:
    """1234 -> "1.2K", 124_439_808 -> "124.4M"."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def start_run(store: Store, base: ModelVersion, *, method: str, epochs: int | None, snapshot_id: int | None) -> int:
    """Start the run process on snapshot `snapshot_id`, or on what would train now (frozen into
    a snapshot, or the existing one with the same content)."""
    from finetune.jobs import JobSpec, start_finetune
    from finetune.lora import LoRAConfig

    snap = (
        store.snapshot(snapshot_id)
        if snapshot_id is not None
        else store.create_snapshot(
            DataFilter(), name=f"fine-tune of {base.name} {time.strftime('%Y-%m-%d %H:%M')}", reuse=True
        )
    )
    if snap.n_examples == 0:
        raise KettleError("nothing to train on: vote answers up (u) or correct them (c) in the chat")
    sft: dict = {"lora": LoRAConfig().to_dict()} if method == "lora" else {}
    if epochs is not None:
        sft["epochs"] = epochs
    # activate=False: the user decides on the result screen whether to switch.
    return start_finetune(JobSpec(model=base.name, snapshot_id=snap.id, sft=sft, activate=False), store)


class RunUpdate(Message):
    """The run's latest state; a newer one replaces one not yet handled (no backlog)."""

    def __init__(self, run: Run, metrics: list[tuple[int, dict]], output: ModelVersion | None):
        super().__init__()
        self.run = run
        self.metrics = metrics
        self.output = output

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunUpdate)


def read_run(store: Store, run_id: int) -> tuple[Run, list[tuple[int, dict]], ModelVersion | None]:
    from finetune.jobs import reap_dead_runs

    run = store.run(run_id)
    if run.status == "running" and run_id in reap_dead_runs(store):  # killed: say so, not "running"
        run = store.run(run_id)
    output = store.model_version(run.output_model_id) if run.output_model_id else None
    return run, store.run_metrics(run_id), output


class FinetuneScreen(Screen):
    BINDINGS = [
        Binding("ctrl+g", "start", "Start", id="finetune.start"),
        Binding("ctrl+x", "cancel_run", "Cancel run", id="finetune.cancel"),
        Binding("ctrl+w", "switch", "Switch to new model", id="finetune.switch"),
    ]

    def __init__(self):
        super().__init__()
        self.plan: Plan | None = None
        self.run_id: int | None = None
        self.run: Run | None = None
        self.output: ModelVersion | None = None

    def compose(self):
        yield Static("[b]Fine-tune[/]  [dim]teach the model your labelled answers[/]", classes="screen-title")
        with VerticalScroll(id="finetune-body"):
            with Vertical(id="finetune-progress-box"):
                yield Static("", id="run-title")
                # the run's own estimate (run-stats, "at most ... left": it stops once the answers
                # come back) is the one shown; the bar's, from its own rate, contradicted it
                yield ProgressBar(id="run-progress", show_eta=False)
                yield Static("", id="run-stats")
                # The buttons under the bar, then the verdict, then the chart: below them, at
                # 80x24 Switch was below the fold (focus did not always scroll to it).
                with Horizontal(id="finetune-done-buttons"):
                    yield Button("Cancel run  ctrl+x", id="ft-cancel", variant="error")
                    yield Button("Switch to the new model  ctrl+w", id="ft-switch", variant="success")
                    yield Button("Compare with the base  F6", id="ft-compare")
                yield Static("", id="finetune-result")
                yield Static("", id="loss-caption")
                yield Sparkline([], id="loss-chart")
            with Vertical(id="finetune-sheet"):
                yield Static("Reading your labels…", id="sheet-summary")
                yield Label("Base model")
                yield Select([], id="ft-base", allow_blank=True, prompt="…")
                yield Label("Train on")
                yield Select([("Current labels", CURRENT)], id="ft-data", allow_blank=False, value=CURRENT)
                yield Label("Method")
                yield Select(
                    [("LoRA adapters (small, light on memory)", "lora"), ("Full fine-tuning (every weight)", "full")],
                    id="ft-method",
                    allow_blank=False,
                    value="full",
                )
                yield Label("Epochs at most (blank = automatic: it stops once your answers come back)")
                yield Input(id="ft-epochs", placeholder="auto", compact=True)
                yield Static("", id="sheet-estimate")
                with Horizontal(id="finetune-buttons"):
                    yield Button("Start  ctrl+g", id="ft-start", variant="primary")
        yield KettleFooter()

    def on_mount(self) -> None:
        self.query_one("#finetune-progress-box").display = False
        self.load_plan()
        self.attach_running()

    def on_screen_resume(self) -> None:
        if self.run_id is None or (self.run and self.run.status in ("finished", "failed", "cancelled")):
            self.load_plan(snapshot_id=self.chosen_snapshot())

    # -- the sheet ----------------------------------------------------------------------------

    def chosen_snapshot(self) -> int | None:
        value = self.query_one("#ft-data", Select).value
        return None if value == CURRENT else int(value)

    @work(exclusive=True, group="finetune-plan")
    @guarded
    async def load_plan(self, base_name: str | None = None, snapshot_id: int | None = None) -> None:
        plan = await self.app.db(make_plan, self.app.store, base_name, snapshot_id=snapshot_id)
        self.plan = plan
        base = self.query_one("#ft-base", Select)
        options = [(f"{v.name}  ({v.kind})", v.name) for v in plan.versions]
        if [o[1] for o in options] != [o[1] for o in getattr(self, "_base_options", [])]:
            base.set_options(options)
            self._base_options = options
        base.value = plan.base.name
        data = self.query_one("#ft-data", Select)
        snapshots = [(Text(f"snapshot #{s.id} {s.name} ({s.n_examples} examples)"), s.id) for s in plan.snapshots]
        if [o[1] for o in snapshots] != [o[1] for o in getattr(self, "_data_options", [])]:
            data.set_options([("Current labels", CURRENT), *snapshots])
            self._data_options = snapshots
        data.value = plan.snapshot.id if plan.snapshot else CURRENT
        self.query_one("#ft-method", Select).value = plan.method
        self.show_estimate()

    def show_estimate(self) -> None:
        plan = self.plan
        if plan is None:
            return
        params = f"{count(plan.n_params)} parameters"
        source = (
            f"snapshot #{plan.snapshot.id} {escape(plan.snapshot.name)}"
            if plan.snapshot
            else "your labels (up-voted and corrected answers)"
        )
        self.query_one("#sheet-summary", Static).update(
            f"[b]{counted(plan.n_examples, 'example')}[/] from {source}, "
            f"{plan.train_tokens:,} tokens.  Base: [b]{escape(plan.base.name)}[/], {params}, on {plan.device}."
        )
        method = self.query_one("#ft-method", Select).value
        epochs = self._epochs()
        estimate = self.query_one("#sheet-estimate", Static)
        if epochs is False:
            estimate.update("[$error]Epochs must be a whole number from 1 to 1000, or blank.[/]")
            return
        if plan.n_examples == 0:
            estimate.update(
                "[$warning]Nothing to train on yet: in the chat, vote answers up (u) or correct them (c).[/]"
            )
            return
        seconds, steps = estimate_seconds(plan, str(method), epochs=epochs)
        default = " (the default for this size and device)" if method == plan.method else ""
        replay = (
            f"{plan.n_replay:,} of its own examples to replay, so it keeps its skills"
            if plan.n_replay
            else "no instruction data of its own to replay"
        )
        estimate.update(
            f"Method: [b]{'LoRA' if method == 'lora' else 'full'}[/]{default}.  "
            f"At most [b]{steps} steps, {duration(seconds)}[/] (it stops once your "
            f"answers come back).  The base has {replay}.  The model you chat with "
            "stays until you switch."
        )

    def _epochs(self) -> int | None | bool:
        """The typed epochs; None for automatic, False when the text is not usable."""
        text = self.query_one("#ft-epochs", Input).value.strip()
        if not text:
            return None
        try:
            value = int(text)
        except ValueError:
            return False
        return value if 1 <= value <= 1000 else False

    @on(Select.Changed, "#ft-method")
    @on(Input.Changed, "#ft-epochs")
    def _sheet_changed(self) -> None:
        self.show_estimate()

    @on(Select.Changed, "#ft-base")
    def _base_changed(self, event: Select.Changed) -> None:
        if self.plan is not None and event.value != self.plan.base.name and event.value is not Select.NULL:
            self.load_plan(str(event.value), self.chosen_snapshot())

    @on(Select.Changed, "#ft-data")
    def _data_changed(self) -> None:
        if self.plan is not None and self.chosen_snapshot() != (self.plan.snapshot and self.plan.snapshot.id):
            self.load_plan(self.plan.base.name, self.chosen_snapshot())

    @on(Button.Pressed, "#ft-start")
    def _start_pressed(self) -> None:
        self.action_start()

    @work(exclusive=True, group="finetune-start")
    @guarded
    async def action_start(self) -> None:
        if self.run is not None and self.run.status in ("queued", "running"):
            self.notify("A fine-tune is already running.", severity="warning")
            return
        # Started from the palette as the screen opened: the sheet is read first.
        for worker in [w for w in self.workers if w.node is self and w.group == "finetune-plan"]:
            if worker.state == WorkerState.RUNNING:
                await worker.wait()
        if self.plan is None:
            return
        epochs = self._epochs()
        if epochs is False:
            raise KettleError("epochs must be a whole number from 1 to 1000, or blank")
        method = str(self.query_one("#ft-method", Select).value)
        run_id = await self.app.db(
            start_run,
            self.app.store,
            self.plan.base,
            method=method,
            epochs=epochs,
            snapshot_id=self.plan.snapshot.id if self.plan.snapshot else None,
        )
        self.notify(f"Fine-tuning started (run {run_id}). Keep chatting; F5 shows progress.")
        self.follow(run_id)

    # -- following a run ------------------------------------------------------------------------

    @work(exclusive=True, group="finetune-attach")
    @guarded
    async def attach_running(self) -> None:
        runs = await self.app.db(self.app.store.runs, "running", 1)
        if runs and runs[0].kind == "finetune" and self.run_id is None:
            self.follow(runs[0].id)

    def follow(self, run_id: int) -> None:
        self.run_id = run_id
        self.run = self.output = None
        self.query_one("#finetune-progress-box").display = True
        self.query_one("#finetune-sheet").display = False
        self.query_one("#loss-chart", Sparkline).data = []
        self.query_one("#loss-caption", Static).update("")
        self.query_one("#finetune-result", Static).update("")
        self.query_one("#run-progress", ProgressBar).update(total=1, progress=0)  # not the last run's bar
        self.poll(run_id)

    @work(exclusive=True, group="finetune-poll")
    async def poll(self, run_id: int) -> None:
        """Read the run every POLL_S until it ends; each read is posted as a RunUpdate."""
        while True:
            try:
                run, metrics, output = await self.app.db(read_run, self.app.store, run_id)
            except Exception as exc:  # noqa: BLE001 - a busy database: try again next time
                self.log.warning(f"reading run {run_id}: {exc}")
                await asyncio.sleep(POLL_S)
                continue
            self.post_message(RunUpdate(run, metrics, output))
            if run.status in ("finished", "failed", "cancelled"):
                return
            await asyncio.sleep(POLL_S)

    @on(RunUpdate)
    def _update(self, event: RunUpdate) -> None:
        run, metrics = event.run, event.metrics
        self.run, self.output = run, event.output
        losses = [m["loss"] for _, m in metrics if isinstance(m.get("loss"), (int, float))]
        last = next((m for _, m in reversed(metrics) if "loss" in m), {})
        val = next((m["val_loss"] for _, m in reversed(metrics) if "val_loss" in m), None)
        bar = self.query_one("#run-progress", ProgressBar)
        if run.status == "finished" and run.step:  # early-stopped runs end before their cap
            bar.update(total=run.step, progress=run.step)
        elif run.total_steps:
            bar.update(total=run.total_steps, progress=run.step)
        else:  # queued, or starting: no steps yet
            bar.update(total=1, progress=0)
        chart = self.query_one("#loss-chart", Sparkline)
        chart.display = len(losses) >= 2  # one point would fill the whole chart
        chart.data = smoothed(losses)[-200:]
        if len(losses) >= 2:
            self.query_one("#loss-caption", Static).update(
                f"[dim]training loss (smoothed), {len(losses)} readings: {max(losses):.3f} (high) … "
                f"{min(losses):.3f} (low), now {losses[-1]:.3f}[/]"
            )
        self.query_one("#run-title", Static).update(
            f"[b]Run {run.id}[/]: {run.status}  [dim]log: {escape(str(run.log_path))}[/]"
        )
        stats = [f"step {run.step}" if run.status == "finished" else f"step {run.step}/{run.total_steps or '?'}"]
        if losses:
            stats.append(f"loss {losses[-1]:.3f} (from {losses[0]:.3f})")
        if val is not None:
            stats.append(f"held-out {val:.3f}")
        if last.get("tokens_per_s"):
            stats.append(f"{last['tokens_per_s']:,.0f} tokens/s")
        if last.get("eta_s") is not None and run.status == "running":
            # The steps are a cap: a run stops sooner once every correction comes back.
            stats.append(f"at most {duration(last['eta_s'])} left")
        self.query_one("#run-stats", Static).update(" · ".join(stats))
        running = run.status in ("queued", "running")
        self.query_one("#ft-cancel").display = running
        self.query_one("#ft-switch").display = event.output is not None
        self.query_one("#ft-compare").display = event.output is not None
        if not running:
            self._finished(run, event.output)
        self.refresh_bindings()

    def _finished(self, run: Run, output: ModelVersion | None) -> None:
        result = self.query_one("#finetune-result", Static)
        if run.status == "failed":
            result.update(f"[b $error]The run failed:[/] {escape(run.error or 'see the log')}")
            self.notify(f"Fine-tuning failed: {run.error}", severity="error", timeout=10)
        elif run.status == "cancelled":
            result.update(f"Stopped at step {run.step}. Continue it with [b]kettle finetune resume {run.id}[/].")
        elif output is not None:
            m = output.metrics
            verdict = m.get("gate", output.status)
            colour = "$error" if output.status == "regressed" else "$success"
            lines = [escape(line) for line in summary_lines(m)]
            lines[-1] = f"[b {colour}]{lines[-1]}[/]" + (
                "  (think twice before switching)" if output.status == "regressed" else ""
            )
            if m.get("recall_of"):
                lines[0] = f"[b]{lines[0]}[/]"
            result.update(
                f"[b]{escape(output.name)}[/] is ready.\n"
                + "\n".join(lines)
                + "\nSwitch to it now (above), or compare the two first."
            )
            self.query_one("#ft-switch", Button).focus()
            recall = f"{m['recall']} of {m['recall_of']} corrections come back, " if m.get("recall_of") else ""
            self.notify(f"Fine-tune finished: {output.name} ({recall}{verdict}).", timeout=8)
        self.query_one("#finetune-sheet").display = True
        self.load_plan(snapshot_id=self.chosen_snapshot())

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel_run":
            return self.run is not None and self.run.status in ("queued", "running")
        if action == "switch":
            return self.output is not None
        return True

    def commands(self):
        if self.check_action("cancel_run", ()):
            yield SystemCommand("Fine-tune: cancel the run", "Stop after this step (ctrl+x)", self.action_cancel_run)
        if self.check_action("switch", ()):
            yield SystemCommand("Fine-tune: switch to the new model", "ctrl+w", self.action_switch)

    @on(Button.Pressed, "#ft-cancel")
    @work(group="finetune-cancel")
    @guarded
    async def action_cancel_run(self) -> None:
        from finetune.jobs import cancel_run

        if self.run_id is not None and await self.app.db(cancel_run, self.app.store, self.run_id):
            self.notify("Stopping after the current step (a checkpoint is kept)…")

    @on(Button.Pressed, "#ft-switch")
    @work(group="finetune-switch")
    @guarded
    async def action_switch(self) -> None:
        from tui.screens.models import activate

        if self.output is not None:
            await activate(self.app, self.output)

    @on(Button.Pressed, "#ft-compare")
    async def _compare(self) -> None:
        if self.output is None:
            return
        await self.app.run_action("go('compare')")
        base = self.output.parent_id
        self.app.screen.post_message(CompareRequest(self.output.name, base))


class CompareRequest(Message):
    """Ask the compare screen to preselect two models (by name, and parent id)."""

    def __init__(self, name: str, parent_id: int | None):
        super().__init__()
        self.name = name
        self.parent_id = parent_id
