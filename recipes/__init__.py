"""Built-in recipes: one module each, exporting its class as ``RECIPE``.

A recipe is a task class with named defaults. Subclass one for a new task:

    from recipes.vit_cifar import VitCifar

    class MyFlowers(VitCifar):
        data_defaults = {**VitCifar.data_defaults, "dataset": "/data/flowers"}

    # python -m peft_lightning fit --recipe my_module:MyFlowers --model.num_classes 102
"""
