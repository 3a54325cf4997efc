"""The `tuneloop` command line. Each command is a thin shell around one library function.

Every error a user can cause ends in one line on stderr (``error: ...``) and a non-zero exit code;
the codes come from :mod:`tuneloop.errors`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tuneloop.errors import TuneloopError

DEFAULT_CONFIG = "tuneloop.yaml"
DEFAULT_TRAINING_PIPELINE = "training"

config_option = click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False),
    help="The project's tuneloop.yaml.",
)


@click.group()
@click.version_option(package_name="tuneloop")
def cli() -> None:
    """tuneloop: validate, fine-tune, compress, gate and register transformer models on Kubeflow."""


@cli.command()
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Labelled CSV or Parquet file.")
@click.option("--text-column", required=True, help="Column holding the text.")
@click.option("--label-column", required=True, help="Column holding the label.")
@click.option("--id-column", default=None, help="Unique id column (derived from the text when omitted).")
@click.option("--timestamp-column", default=None, help="Event time column (derived when omitted).")
@click.option("--name", default=None, help="Project and registered model name (default: the file's stem).")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False))
@click.option("--label-names", default=None, help="Comma-separated names for the sorted label values, e.g. ham,spam.")
@click.option("--force", is_flag=True, help="Overwrite an existing tuneloop.yaml.")
def init(data, text_column, label_column, id_column, timestamp_column, name, directory, label_names, force) -> None:
    """Turn a labelled data file into a project: tuneloop.yaml plus the Feast sources."""
    from tuneloop.project import init_project

    summary = init_project(
        data,
        text_column=text_column,
        label_column=label_column,
        id_column=id_column,
        timestamp_column=timestamp_column,
        name=name,
        directory=directory,
        label_names=label_names.split(",") if label_names else None,
        force=force,
    )
    click.echo(f"wrote {summary.config_path}")
    click.echo(f"wrote {summary.texts_path} and {summary.labels_path}: {summary.rows} rows, classes {summary.classes}")
    for line in summary.choices or []:
        click.echo(line)
    if summary.dropped_duplicates or summary.dropped_conflicting:
        click.echo(
            f"dropped {summary.dropped_duplicates} duplicate rows and "
            f"{summary.dropped_conflicting} rows whose text appears under two labels"
        )


def kubeflow_options(command):
    """Options shared by the commands that talk to a Kubeflow Pipelines API."""
    command = click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user).")(command)
    command = click.option(
        "--token-file", default=None, type=click.Path(dir_okay=False),
        help="Bearer token file, e.g. a projected service-account token. A token itself is read from "
             "TUNELOOP_KFP_TOKEN or KF_PIPELINES_TOKEN, never from a flag.",
    )(command)
    return command


def _connect(host, namespace, token_file):
    from tuneloop import kubeflow

    return kubeflow.connect(host, namespace=namespace, token_file=token_file)


@cli.command()
@click.option("--local", "local_run", is_flag=True, help="Run on this machine through kfp.local.")
@click.option("--host", default=None, help="Kubeflow Pipelines API URL: run the latest uploaded version there.")
@config_option
@click.option("--pipeline", "pipeline", default=DEFAULT_TRAINING_PIPELINE, show_default=True,
              help="Shipped pipeline name, or the path of a pipeline file, to run (--local).")
@click.option("--pipeline-name", default="tuneloop-training", show_default=True, help="Uploaded pipeline (--host).")
@click.option("--experiment", default="tuneloop", show_default=True, help="KFP experiment (--host).")
@click.option("--param", "params", multiple=True, help="Run parameter k=v (--host); repeatable.")
@kubeflow_options
@click.option("--base-model", default="", help="Override training.base_model for this run.")
@click.option("--epochs", default=0, type=click.IntRange(min=0), help="Override training.epochs (0: config).")
@click.option("--learning-rate", default=0.0, type=click.FloatRange(min=0.0), help="Override training.learning_rate.")
@click.option("--resume", "resume_run", default=None, metavar="RUN",
              help="(--local) Re-run local run RUN: reuse its finished steps (fingerprints verified), resume "
                   "finetune from its checkpoint.")
def run(local_run, host, config_path, pipeline, pipeline_name, experiment, params, namespace, token_file,
        base_model, epochs, learning_rate, resume_run) -> None:
    """Run the training pipeline: locally (--local) or on Kubeflow (--host), and say what happened."""
    from tuneloop import registry
    from tuneloop.config import load_config
    from tuneloop.orchestration import run_local
    from tuneloop.summary import summarize

    if local_run == bool(host):
        raise click.UsageError("pass exactly one of --local (this machine) or --host URL (Kubeflow)")
    if resume_run and not local_run:
        raise click.UsageError("--resume RUN re-runs a local run: use it with --local")
    if host:
        from tuneloop import kubeflow

        client = _connect(host, namespace, token_file)
        run_id = kubeflow.run_latest(client, pipeline_name, experiment=experiment,
                                     params=kubeflow.parse_params(params))
        click.echo(f"started run {run_id} of the latest version of {pipeline_name} on {host}")
        return
    config = load_config(config_path)
    finished = run_local(config, pipeline, base_model=base_model, epochs=epochs, learning_rate=learning_rate,
                         resume=resume_run)
    click.echo(summarize(finished, registry.list_versions(config)))
    for line in finished.resume_lines:
        click.echo(line)


@cli.command(name="compile")
@click.argument("pipeline", metavar="PIPELINE")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Where to write the IR YAML.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Bake this cluster tuneloop.yaml (world: cluster) in as the default of the config_json "
                   "parameter; its kubeflow section sets images, GPU, resources, secrets and retries. A "
                   "config whose shared state would be pod-local is refused, one line per field.")
@click.option("--image", default=None, help="Component image (overrides kubeflow.image).")
@click.option("--gpu-image", default=None, help="Image of GPU steps (overrides kubeflow.gpu_image).")
def compile_command(pipeline, output, config_path, image, gpu_image) -> None:
    """Compile PIPELINE to KFP IR YAML for a Kubeflow cluster.

    PIPELINE is a shipped pipeline, ``training`` or ``monitoring``, or the path of a pipeline file.
    """
    from tuneloop.config import KubeflowConfig, load_config
    from tuneloop.orchestration import compile_pipeline

    config = load_config(config_path, resolve_paths=False) if config_path else None
    kubeflow = (config.kubeflow if config else KubeflowConfig()).model_copy()
    kubeflow.image = image or kubeflow.image
    kubeflow.gpu_image = gpu_image or kubeflow.gpu_image
    click.echo(f"wrote {compile_pipeline(pipeline, output, config, kubeflow)}")


@cli.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--host", required=True, help="Kubeflow Pipelines API URL.")
@click.option("--name", default=None, help="Pipeline name (default: the name inside the YAML).")
@kubeflow_options
def upload(pipeline_file, host, name, namespace, token_file) -> None:
    """Upload compiled pipeline YAML: a new pipeline, or a new version when the content changed."""
    from tuneloop import kubeflow

    result = kubeflow.upload(_connect(host, namespace, token_file), pipeline_file, name=name)
    state = "uploaded" if result.created else "unchanged, already uploaded as"
    click.echo(f"{state} version {result.version_name} (pipeline {result.pipeline_id})")


@cli.command()
@click.option("--host", required=True, help="Kubeflow Pipelines API URL.")
@click.option("--cron", required=True, help="Cron expression; 5 fields, or KFP's 6 with seconds first.")
@click.option("--name", default="tuneloop-retraining", show_default=True, help="Recurring run name (one per name).")
@click.option("--pipeline-name", default="tuneloop-training", show_default=True, help="Uploaded pipeline to run.")
@click.option("--experiment", default="tuneloop", show_default=True)
@click.option("--param", "params", multiple=True, help="Run parameter k=v; repeatable.")
@kubeflow_options
def schedule(host, cron, name, pipeline_name, experiment, params, namespace, token_file) -> None:
    """Create or update one recurring run that always runs the latest pipeline version."""
    from tuneloop import kubeflow

    result = kubeflow.schedule(_connect(host, namespace, token_file), pipeline_name, cron=cron, name=name,
                               experiment=experiment, params=kubeflow.parse_params(params))
    state = "created" if result.created else ("updated" if result.updated else "unchanged")
    click.echo(f"{state} recurring run {name} ({result.recurring_run_id}): {cron}")


@cli.command()
@config_option
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: deployment.port).")
@click.option("--version", "model_version", default=None, help="Serve this registry version instead of champion.")
def serve(config_path, port, model_version) -> None:
    """Serve the champion (or --version) with BentoML on this machine; restart to pick up a new champion."""
    from tuneloop import deployment

    code = deployment.serve(config_path, port=port, version=model_version)
    if code:
        sys.exit(code)


@cli.command()
@config_option
@click.option("--window", default=None,
              help="24h, 90m, 7d, or a number of recent records like 5000 (default: monitoring.window).")
def monitor(config_path, window) -> None:
    """Check served traffic for drift; on drift alert and start retraining (cooldown-guarded).

    Exit codes: 0 no drift, 10 drift detected, 11 insufficient data, 12 an alert waits in the
    spool; errors have their own codes. The last line is the verdict.
    """
    from tuneloop.config import load_config
    from tuneloop.monitoring import monitor as run_monitor

    sys.exit(run_monitor(load_config(config_path), window).exit_code)


@cli.group()
def models() -> None:
    """The model registry: versions, aliases and metrics."""


@models.command(name="promote")
@click.argument("version")
@config_option
def promote_model(version, config_path) -> None:
    """Point champion at VERSION (on Kubernetes: roll out, smoke-test, roll back on failure)."""
    from tuneloop import deployment
    from tuneloop.config import load_config

    click.echo(deployment.promote(load_config(config_path), version).message)


@models.command(name="rollback")
@config_option
def rollback_model(config_path) -> None:
    """Move champion back to the previous champion (on Kubernetes: re-roll the Deployment)."""
    from tuneloop import deployment
    from tuneloop.config import load_config

    click.echo(deployment.rollback(load_config(config_path)).message)


@models.command(name="list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (version, aliases, metrics, ...).")
def list_models(config_path, as_json) -> None:
    """List the registered versions of the project's model, newest first."""
    from tuneloop import registry
    from tuneloop.config import load_config

    config = load_config(config_path)
    versions = registry.list_versions(config)
    if as_json:
        click.echo(json.dumps(versions, indent=2))
        return
    if not versions:
        click.echo(f"no versions of {config.registry.model_name} registered yet")
        return
    click.echo(f"{'version':>7}  {'aliases':<22} {'test macro-F1':>13}  {'accuracy':>8}  precision")
    for row in versions:
        metrics = row["metrics"]
        click.echo(
            f"{row['version']:>7}  {', '.join(row['aliases']) or '-':<22} "
            f"{metrics.get('macro_f1', float('nan')):>13.4f}  {metrics.get('accuracy', float('nan')):>8.4f}  "
            f"{row['precision']}"
            + ("  [trained on erased data]" if row.get("trained_on_erased_data") else "")
        )


@cli.group()
def features() -> None:
    """The Feast feature store: set-up (apply, materialize); pipeline runs only read it."""


def _until(value: str | None):
    from datetime import datetime, timezone

    if not value:
        return datetime.now(timezone.utc)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise click.BadParameter(f"{value!r} is not an ISO date or time (e.g. 2026-12-01T00:00Z)") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@features.command(name="apply")
@config_option
@click.option("--materialize/--no-materialize", "load_online", default=False, show_default=True,
              help="Also load the latest texts into the online store (Redis in a cluster).")
@click.option("--until", default=None, help="Materialise texts known up to this ISO time (default: now).")
def apply_features(config_path, load_online, until) -> None:
    """Prepare the texts source, register the definitions, optionally materialise (set-up, idempotent).

    Run it once per cluster and again whenever the config's features or the texts change (CI/CD);
    a second run with nothing new changes nothing.
    """
    from tuneloop import features as feature_store
    from tuneloop.config import load_config

    result = feature_store.apply(load_config(config_path), materialize_until=_until(until) if load_online else None)
    click.echo(f"texts source: {result.texts_source}")
    click.echo(f"registry {result.registry}: " + ("; ".join(result.changes) if result.changes else "unchanged"))
    if result.materialized_until:
        click.echo(f"online store: materialised up to {result.materialized_until.isoformat()}")


@features.command(name="materialize")
@config_option
@click.option("--until", default=None, help="Materialise texts known up to this ISO time (default: now).")
def materialize_features(config_path, until) -> None:
    """Load the latest text of each entity into the online store (needs `features apply` first)."""
    from tuneloop import features as feature_store
    from tuneloop.config import load_config

    moment = _until(until)
    feature_store.materialize(load_config(config_path), moment)
    click.echo(f"online store: materialised up to {moment.isoformat()}")


@cli.command()
@config_option
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="The study's total number of trials (default: tuning.trials); a rerun adds only the missing ones.")
@click.option("--dataset", default=None, type=click.Path(dir_okay=False),
              help="A Dataset artifact (Parquet with a split column); default: built from the config's data.")
def tune(config_path, trials, dataset) -> None:
    """Search hyperparameters with Optuna (TPE, pruning) and report the best ones."""
    from tuneloop.config import load_config
    from tuneloop.tuning import tune as run_search

    summary = run_search(load_config(config_path), dataset, trials=trials)
    click.echo(f"study {summary.study_name!r} ({summary.storage}): {summary.trials} trials, {summary.completed} "
               f"completed, {summary.pruned} pruned, {summary.failed} failed ({summary.ran_here} run now)")
    click.echo(f"best validation macro-F1 {summary.best_value:.4f} (trial {summary.best_trial}): "
               f"{json.dumps(summary.best_params, sort_keys=True)}")
    if summary.registry_run_id:
        click.echo(f"recorded in the registry as run {summary.registry_run_id}")


@cli.command()
@config_option
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False), default=None,
              help="File with one id per line: entity ids of the data, or request ids of the prediction log.")
@click.option("--texts", "texts_file", type=click.Path(dir_okay=False), default=None,
              help="File with one text per line to erase wherever it appears.")
def forget(config_path, ids_file, texts_file) -> None:
    """Erase ids or texts: new sources without them, prediction log records deleted, registry versions
    trained on them tagged, the next training run excludes them; audited with hashed ids.

    Exit codes: 0 every id erased (or erased before), 13 some ids matched nothing (listed per id).
    """
    from tuneloop import erasure
    from tuneloop.config import load_config

    if bool(ids_file) == bool(texts_file):
        raise click.UsageError("give exactly one of --ids FILE or --texts FILE")
    config = load_config(config_path)
    if ids_file:
        report = erasure.forget(config, ids=erasure.read_subjects(ids_file, what="ids"))
    else:
        report = erasure.forget(config, texts=erasure.read_subjects(texts_file, what="texts"))
    for line in report.lines():
        click.echo(line)
    if report.exit_code:
        click.echo(f"error: {len(report.unmatched)} of {len(report.outcomes)} given ids matched nothing: "
                   + ", ".join(report.unmatched[:20]), err=True)
        sys.exit(report.exit_code)


def main() -> None:
    """Entry point: run the CLI, turning tuneloop errors into one line and an exit code."""
    try:
        cli(standalone_mode=False)
    except TuneloopError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
