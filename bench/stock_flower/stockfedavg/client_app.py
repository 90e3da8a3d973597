"""ClientApp: stock Flower layout (separate train and evaluate handlers, torch at module top)."""

import torch  # noqa: F401  (imported at module top, as Flower's templates do)
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stockfedavg.task import get_model, load_data
from stockfedavg.task import test as test_fn
from stockfedavg.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = get_model(str(context.run_config["task"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = load_data(str(context.node_config["data-path"]), int(context.run_config["batch-size"]))
    train_loss = train_fn(
        model, loader, int(context.run_config["local-epochs"]), float(msg.content["config"]["lr"])
    )
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": train_loss, "num-examples": len(loader.dataset)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = get_model(str(context.run_config["task"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = load_data(str(context.node_config["data-path"]), int(context.run_config["batch-size"]))
    eval_loss, eval_acc = test_fn(model, loader)
    content = RecordDict({
        "metrics": MetricRecord(
            {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(loader.dataset)}
        ),
    })
    return Message(content=content, reply_to=msg)
