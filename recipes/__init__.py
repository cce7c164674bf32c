"""Built-in recipes: one module each, exporting its class as ``RECIPE``.

A recipe is a task class with named defaults, one dict per part it wires: ``model_defaults``, ``data_defaults``,
``trainer_defaults``, ``finetuning_defaults`` (``FineTuneTask``). Subclass one for a new task:

    from recipes.vit_cifar import VitCifar

    class MyFlowers(VitCifar):
        model_defaults = {**VitCifar.model_defaults, "num_classes": 102}
        data_defaults = {**VitCifar.data_defaults, "dataset": "/data/flowers"}

    # python -m peft_lightning fit --recipe my_module:MyFlowers
"""
