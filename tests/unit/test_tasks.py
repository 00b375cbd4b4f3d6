import pytest

from builder.tasks import TASKS, infer_task


def test_task_list_equals_optimum_tasks_manager():
    pytest.importorskip("optimum")
    from optimum.exporters.tasks import TasksManager

    assert set(TASKS) == set(TasksManager._TRANSFORMERS_TASKS_TO_MODEL_LOADERS)


@pytest.mark.parametrize(
    ("architectures", "task"),
    [
        (["LlamaForCausalLM"], "text-generation"),
        (["BertModel"], "feature-extraction"),
        (["BertForSequenceClassification"], "text-classification"),
        (None, None),
    ],
)
def test_infer_task_from_architectures(architectures, task):
    assert infer_task(architectures) == task
