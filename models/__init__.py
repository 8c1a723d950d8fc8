"""Model code: the deformable convolution layer and the ResNet-50 FCN segmentation model."""
