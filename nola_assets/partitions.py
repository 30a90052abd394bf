"""One partition per dataset folder under the data root (added by the sensor or `nola run`)."""

from dagster import DynamicPartitionsDefinition

DATASETS = "datasets"
datasets_partitions = DynamicPartitionsDefinition(name=DATASETS)
