from llm_lightning.data.datamodule import ClassificationDataModule
from llm_lightning.data.tasks import Split, TaskData, TaskDataError, load_task

__all__ = ["ClassificationDataModule", "Split", "TaskData", "TaskDataError", "load_task"]
