from .hrnet import HRNetPose, HRNetSeg, hrnet_pose, hrnet_seg, HRNET_VARIANTS
