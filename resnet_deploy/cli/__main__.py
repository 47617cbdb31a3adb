"""``python -m resnet_deploy.cli``: the same as the ``resnet-deploy`` script."""

from . import main

main()
