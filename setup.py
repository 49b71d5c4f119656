from setuptools import find_packages, setup

setup(
    name="qwenvl",
    version="0.1.0",
    description="Hugging Face-native Qwen-VL: remote-code model, processor, training and RLHF",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["qwenvl", "qwenvl.*"]),
    package_data={"qwenvl": ["*.jinja", "configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.20,<6",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "accelerate>=1.10",
        "peft>=0.18",
        "trl>=1.16",
        "datasets>=4",
        "numpy",
        "pillow>=10",
        "tqdm",
    ],
    extras_require={
        "demo": ["scikit-learn", "matplotlib"],
        "test": ["pytest>=8", "tiktoken", "scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["qwenvl=qwenvl.cli:main"]},
)
