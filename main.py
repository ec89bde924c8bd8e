"""The seed's entry point, kept for its commands:

    python main.py --config experiments/mnist.gin single
    python main.py --config experiments/mnist.gin --binding "train.batch_size=128" multigpu

Everything lives in pixelcnn.cli (also installed as the `pixelcnn` command).
"""

from pixelcnn.cli import main

if __name__ == "__main__":
    main()
