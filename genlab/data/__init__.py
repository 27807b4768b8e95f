"""Datasets: 2D toy sets, sklearn's digits, image folders and torchvision data sets from a local root."""

from genlab.data.digits import DIGITS_SIZES, Digits, digits_split, stroke_mask
from genlab.data.images import (IMAGE_EXTENSIONS, ImageFolder, LabelledImages, TorchvisionDataset, images_to_tensor,
                                resize_center_crop)
from genlab.data.pairs import FlowPairs, save_pairs
from genlab.data.toy2d import TOY2D_NAMES, Toy2D, toy2d

__all__ = ["DIGITS_SIZES", "Digits", "digits_split", "stroke_mask", "IMAGE_EXTENSIONS", "ImageFolder", "LabelledImages",
           "TorchvisionDataset", "images_to_tensor", "resize_center_crop", "TOY2D_NAMES", "Toy2D", "toy2d", "FlowPairs",
           "save_pairs"]
